# Runs THERE (the lent GPU machine), in the repo root, SOURCED so that PYTHONPATH stays set:
#
#   source bench/gpu/remote_install.sh            # on the device machine
#   source bench/gpu/remote_install.sh --smoke    # here: /tmp/parts-smoke -> /tmp/site-smoke, no GPU needed
#
# Joins the parts of the packed site folder that the calls left in /tmp/parts (see stage_part.sh), checks the
# sha256 that pack.sh wrote, unpacks it to /tmp/site (xz, or Python's lzma without xz; no pip, no index:
# the machine reaches no registry), exports PYTHONPATH=/tmp/site:<repo root>, and checks the install: DALI
# imports, a bare DALI pipeline decodes JPEGs on the CPU and, where the driver sees a GPU, on the "mixed"
# decoder, with pixels checked against Pillow; the packages left out (nvcomp, nvjpeg2k, nvtiff) are absent;
# it lists the NVIDIA libraries that the decodes loaded. Idempotent: where the site folder is already there
# (a later call on the same warm machine) it only exports and checks. Returns non-zero, with the reason,
# when something is missing. TARIMG_PYTHON (default python3) is the interpreter it checks with.
_tarimg_remote_install() {
  local smoke=0
  [ "${1:-}" = "--smoke" ] && smoke=1
  local parts site
  if [ "$smoke" = 1 ]; then
    parts="${TARIMG_PARTS:-/tmp/parts-smoke}" site="${TARIMG_SITE:-/tmp/site-smoke}"
  else
    parts="${TARIMG_PARTS:-/tmp/parts}" site="${TARIMG_SITE:-/tmp/site}"
  fi
  local py="${TARIMG_PYTHON:-python3}" t0=$SECONDS
  if [ ! -f "$site/.beam-tarimg-installed" ]; then
    if ! ls "$parts"/site.tar.xz.part-* >/dev/null 2>&1; then
      echo "remote_install: no parts in $parts. The machine was given back between calls (it keeps" \
           "nothing): start again from the first call (bench/gpu/README.md)." >&2
      return 1
    fi
    if [ ! -f "$parts/site.tar.xz.sha256" ]; then
      echo "remote_install: no site.tar.xz.sha256 in $parts: carry it with the last part" >&2
      return 1
    fi
    cat "$parts"/site.tar.xz.part-* > /tmp/site.tar.xz || return 1
    if ! echo "$(cat "$parts/site.tar.xz.sha256")  /tmp/site.tar.xz" | sha256sum -c --quiet -; then
      echo "remote_install: the joined parts do not match site.tar.xz.sha256: a part is missing or" \
           "damaged. Present: $(cd "$parts" && ls | tr '\n' ' ')" >&2
      return 1
    fi
    local unpack="$site.unpack"
    rm -rf "$unpack" && mkdir -p "$unpack" || return 1
    if command -v xz >/dev/null; then
      xz -dc -T0 /tmp/site.tar.xz | tar -C "$unpack" -xf - || return 1
    else
      "$py" -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2], filter="tar")' \
        /tmp/site.tar.xz "$unpack" || return 1
    fi
    rm -rf "$site" && mv "$unpack/site" "$site" && rm -rf "$unpack" /tmp/site.tar.xz || return 1
    touch "$site/.beam-tarimg-installed"
    echo "remote_install: unpacked $(du -sm "$site" | cut -f1) MB into $site in $((SECONDS - t0)) s"
  fi
  # The fallback call (README): wheels left out of the slim kit, carried in .whl/extra, added to the site.
  if ls .whl/extra/*.whl >/dev/null 2>&1; then
    # Into a folder of their own, then merged: pip --target --upgrade would replace site/nvidia whole.
    rm -rf /tmp/site-extra
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-extra \
      .whl/extra/*.whl || return 1
    cp -a /tmp/site-extra/. "$site/" && rm -rf /tmp/site-extra || return 1
    echo "remote_install: added $(cd .whl/extra && ls *.whl | tr '\n' ' ')to $site"
  fi
  case ":${PYTHONPATH:-}:" in
    *":$site:$PWD:"*) ;;
    *) export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" ;;
  esac
  TARIMG_SMOKE=$smoke "$py" - <<'PY' || return 1
import io, os, sys, time
t0 = time.time()
import numpy as np
from PIL import Image
import nvidia.dali
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline
from beam_tarimg.decode import cuda_device_count

site = os.path.dirname(os.path.dirname(nvidia.dali.__path__[0]))
absent = ("nvidia/libnvcomp", "nvidia/nvjpeg2k", "nvidia/nvtiff", "libcst")
present = [p for p in absent if os.path.exists(os.path.join(site, p))]
if present and not os.path.isdir(".whl/extra"):
    raise SystemExit(f"remote_install: {present} are in {site}: this is not the slim kit that pack.sh makes")
rng = np.random.default_rng(0)
encoded, refs = [], []
for k in range(6):  # baseline 4:2:0, 4:4:4 and progressive: the hardware, CUDA and CPU JPEG paths
    a = (rng.random((48 + 16 * k, 64 + 8 * k, 3)) * 64 + np.arange(64 + 8 * k)[None, :, None]).astype(np.uint8)
    b = io.BytesIO()
    Image.fromarray(a).save(b, "JPEG", quality=90, subsampling=(2, 0)[k % 2], progressive=k == 5)
    encoded.append(np.frombuffer(b.getvalue(), np.uint8))
    refs.append(np.asarray(Image.open(io.BytesIO(b.getvalue())).convert("RGB")))
n_gpu = cuda_device_count()
if n_gpu == 0 and os.environ.get("TARIMG_SMOKE") != "1":
    raise SystemExit("remote_install: the CUDA driver reports no device")
for device in ["cpu"] + (["mixed"] if n_gpu else []):
    pipe = Pipeline(batch_size=len(encoded), num_threads=2, device_id=0 if device == "mixed" else None,
                    prefetch_queue_depth=1)
    with pipe:
        enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
        extra = {"hw_decoder_load": 0.5} if device == "mixed" else {}
        pipe.set_outputs(fn.decoders.image(enc, device=device, output_type=types.RGB, **extra))
    pipe.build()
    pipe.feed_input("enc", encoded)
    (out,) = pipe.run()
    if device == "mixed":
        out = out.as_cpu()
    diffs = [float(np.abs(out.at(i).astype(np.int16) - r).mean()) for i, r in enumerate(refs)]
    print(f"remote_install: bare DALI pipeline, decoders.image(device={device!r}): {len(refs)} JPEGs, "
          f"mean |diff| vs Pillow <= {max(diffs):.3f}")
    if max(diffs) > 2.0:
        raise SystemExit(f"remote_install: {device} decode disagrees with Pillow: {diffs}")
    del pipe
libs = sorted({line.split()[-1].rsplit("/", 1)[-1] for line in open("/proc/self/maps")
               if ".so" in line and any(k in line for k in ("nvjpeg", "nvimgcodec", "nvcomp", "nvtiff", "libdali.so", "libcuda"))})
print(f"remote_install: DALI {nvidia.dali.__version__} from {site}, numpy {np.__version__}, Pillow "
      f"{Image.__version__}, CUDA devices {n_gpu}; checked in {time.time() - t0:.1f} s; loaded: {' '.join(libs)}")
PY
}
_tarimg_remote_install "$@"
