# Runs THERE (the lent GPU machine), in the repo root, SOURCED so that PYTHONPATH stays set:
#
#   source bench/gpu/remote_install.sh
#
# Joins the wheel parts that the upload calls left in /tmp/parts (see stage_part.sh), checks the sha256 that
# pack.sh wrote, installs the wheels with pip --target /tmp/site (no index, no deps: the machine reaches no
# registry), exports PYTHONPATH=/tmp/site:<repo root>, and checks that DALI imports and the driver sees a GPU.
# Idempotent: on a machine that already has the install (same warm machine, a later call) it only exports
# and checks. Returns non-zero, with the reason, when something is missing.
_tarimg_remote_install() {
  local parts="${TARIMG_PARTS:-/tmp/parts}" site="${TARIMG_SITE:-/tmp/site}" t0=$SECONDS
  if [ ! -f "$site/.beam-tarimg-installed" ]; then
    if ! ls "$parts"/wheels.tar.part-* >/dev/null 2>&1; then
      echo "remote_install: no wheel parts in $parts. The machine was given back between calls (it keeps" \
           "nothing): start again from the first upload call (bench/gpu/README.md)." >&2
      return 1
    fi
    cat "$parts"/wheels.tar.part-* > /tmp/wheels.tar || return 1
    if [ -f "$parts/wheels.tar.sha256" ]; then
      if ! echo "$(cat "$parts/wheels.tar.sha256")  /tmp/wheels.tar" | sha256sum -c --quiet -; then
        echo "remote_install: the joined parts do not match wheels.tar.sha256: a part is missing or" \
             "damaged. Present: $(cd "$parts" && ls | tr '\n' ' ')" >&2
        return 1
      fi
    else
      echo "remote_install: no wheels.tar.sha256 in $parts (carry it with the last part); not checked" >&2
    fi
    rm -rf /tmp/wheels && tar -C /tmp -xf /tmp/wheels.tar && rm -f /tmp/wheels.tar || return 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      /tmp/wheels/*.whl || return 1
    rm -rf /tmp/wheels
    touch "$site/.beam-tarimg-installed"
    echo "remote_install: installed $(ls "$site" | grep -c dist-info) packages into $site in $((SECONDS - t0)) s"
  fi
  case ":${PYTHONPATH:-}:" in
    *":$site:$PWD:"*) ;;
    *) export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" ;;
  esac
  python3 - <<'PY' || return 1
import nvidia.dali, numpy, PIL
from beam_tarimg.decode import cuda_device_count
n = cuda_device_count()
print(f"remote_install: DALI {nvidia.dali.__version__} from {nvidia.dali.__path__[0]}, numpy {numpy.__version__}, "
      f"Pillow {PIL.__version__}, CUDA devices {n}")
if n == 0:
    raise SystemExit("remote_install: the CUDA driver reports no device")
PY
}
_tarimg_remote_install
