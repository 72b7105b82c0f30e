"""The command-line options shared by the runnable pipelines, and their checks before any work is done.

``TarImagesOptions`` is a Beam ``PipelineOptions`` subclass: its flags travel with the pipeline options like any
Beam flag. It defines the flags of every job; each job takes only its own set (``SUMMARIZE_FLAGS``,
``TFRECORD_FLAGS``, ``PARQUET_FLAGS``), so its ``--help`` lists only those and the others are usage errors. Every flag it does not define is handed to Beam (``--runner``, ``--direct_num_workers``,
``--direct_running_mode``, ``--temp_location``, ...); a flag that neither knows is a usage error.

Beam parses the flags of every ``PipelineOptions`` subclass it has seen whenever it reads options, so these
flags have no ``required=True`` (that would break every other pipeline in the process) and other modules
should reuse this class rather than define another ``--input`` or ``--output``.

This module imports Apache Beam only when it needs it: ``--help``, errors in our own flags and in Beam's flags
(checked against Beam's option definitions read from its source, ``beam_flag_parser``) and the checks of
local paths come back without it (Beam's import alone takes seconds on a busy machine). ``TarImagesOptions`` is made on first
access; a job's own run never makes it, so its flags do not travel to the workers (whose Beam would log them
as unparseable). ``--overwrite`` and ``--quiet`` (``add_job_flags``) say how a job runs, not what its
pipeline does, and are not pipeline options.
"""

from __future__ import annotations

import argparse
import os
import uuid
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from beam_tarimg.decode import DEVICES
from beam_tarimg.schema import DEFAULT_IMAGE_FORMAT, IMAGE_FORMATS, ORIGINAL, PARQUET_CODECS, PNG
from beam_tarimg.tario import DEFAULT_EXTENSIONS, normalize_extensions

DEFAULT_RUNNER = "FnApiRunner"
# Beam knows "FnApiRunner" as a short name only from 2.6x on; its full name works on every supported version.
_FULL_RUNNER_NAMES = {"fnapirunner": "apache_beam.runners.portability.fn_api_runner.FnApiRunner"}

_BEAM_FLAGS_EPILOG = (
    "Every other flag is a standard Beam pipeline option and is passed through to Beam, e.g. --runner "
    "(default here: FnApiRunner), --direct_num_workers, --direct_running_mode, --temp_location. "
    "Exit codes: 0 done; 1 the pipeline failed; 2 usage error (bad flag, input that matches nothing, "
    "unwritable output, outputs of an earlier run without --overwrite); 3 tars matched but no image was "
    "written (the failures by stage go to stderr); 130 interrupted (SIGINT, Ctrl-C); 143 terminated (SIGTERM); 129 hung up (SIGHUP). "
    "An interrupted job removes what it had written. On a local runner a progress display goes to stderr: a "
    "bar on a terminal, else a line every BEAM_TARIMG_PROGRESS_INTERVAL seconds (default 10)."
)


# The flags of each job, by dest name; those a job takes of REQUIRED are required on its command line.
SUMMARIZE_FLAGS = ("input", "batch_size", "num_threads", "device", "extensions", "include_metadata", "failures")
# Resize on decode (beam_tarimg.Resize): the writing jobs take its geometry, which gives uint8 HWC images that
# their sinks write; pipelines.embed also takes the model input's dtype, layout and normalization.
RESIZE_FLAGS = ("resize", "crop", "resize_mode", "interpolation")
TFRECORD_FLAGS = SUMMARIZE_FLAGS + ("output", "image_format", "jpeg_quality", "num_shards", "preview_rows",
                                    *RESIZE_FLAGS)
PARQUET_FLAGS = TFRECORD_FLAGS + ("row_group_mb", "codec")
MODEL_INPUT_FLAGS = RESIZE_FLAGS + ("mean", "std", "layout", "dtype")
EMBED_FLAGS = SUMMARIZE_FLAGS + ("output", "num_shards", "preview_rows", "row_group_mb", "codec", "model",
                                 *MODEL_INPUT_FLAGS)
REQUIRED = ("input", "output", "model")
RESIZE_MODES = ("shorter", "letterbox", "stretch")
INTERPOLATIONS = ("linear", "cubic")

# Help texts that differ by job (the defaults in _TarImagesFlags speak of a job that writes Parquet).
SUMMARIZE_HELP = {
    "include_metadata": "also read and parse each sample's .json and .txt sidecars, as the writing jobs do with "
                        "this flag: a .json sidecar that is not valid JSON is then a metadata failure",
    "overwrite": "remove the --failures file of an earlier run first; without it the job refuses to start where "
                 "that file exists",
}
TFRECORD_HELP = {
    "output": "path prefix of the output files, e.g. out/images gives out/images-00000-of-00004.tfrecord",
}
EMBED_HELP = {
    "output": "path prefix of the output files, e.g. out/embeddings gives out/embeddings-00000-of-00004.parquet "
              "(columns image_id, image_path, embedding: list<float32>)",
    "batch_size": "images per DALI batch, and per model call (default 100)",
    "row_group_mb": "close a Parquet row group at this many MiB of embeddings (default 64)",
    "codec": "Parquet compression codec (default none)",
    "preview_rows": "after the summary, print this many rows of the output (default 5; 0 for none)",
}


class UsageError(Exception):
    """A user error found before any work was done; printed as one line, exit code 2."""


class _TarImagesFlags:
    """Flags of ``python -m pipelines.tar_to_parquet`` / ``tar_to_tfrecord`` / ``summarize``; the Beam-free
    half of ``TarImagesOptions``."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--input", default=None,
            help="tar shards to read: a glob (data/*.tar, gs://bucket/shards/*.tar) or a directory (all *.tar "
                 "in it), on any filesystem Beam knows",
        )
        parser.add_argument(
            "--output", default=None,
            help="path prefix of the output files, e.g. out/images gives out/images-00000-of-00004.parquet",
        )
        parser.add_argument("--batch_size", type=int, default=100, help="images per DALI batch (default 100)")
        parser.add_argument(
            "--num_threads", type=int, default=None,
            help="DALI CPU threads per worker process (default: the cores the worker may use)",
        )
        parser.add_argument(
            "--device", default="auto", choices=DEVICES,
            help="decode on the GPU, the CPU, or auto: the GPU when the worker sees one (default auto)",
        )
        parser.add_argument(
            "--extensions", default=",".join(DEFAULT_EXTENSIONS),
            help="comma-separated extensions of the JPEG members (default jpg,jpeg)",
        )
        parser.add_argument(
            "--include_metadata", action="store_true", default=False,
            help="attach each sample's .json and .txt sidecars as the metadata column",
        )
        parser.add_argument(
            "--failures", default=None, metavar="PATH",
            help="write one JSON line per lost input (tar, member, stage, error) to this file",
        )
        parser.add_argument(
            "--image_format", default=None, choices=IMAGE_FORMATS,
            help="how images are stored: original (default: each JPEG's own bytes, unchanged; about the size of "
                 "the input), raw (decoded HxWxC uint8 pixels, ~13x the input), png (lossless re-encode, ~5x, slow) "
                 "or jpeg (lossy re-encode). With --resize: png by default, and original is refused (it would "
                 "store the JPEG, not the resized pixels)",
        )
        parser.add_argument("--jpeg_quality", type=int, default=95, help="quality of --image_format jpeg (95)")
        parser.add_argument(
            "--num_shards", type=int, default=0,
            help="number of output files (default 0: the runner decides). Distributed runners only: Beam's "
                 "fixed sharding groups the whole output by shard, which a local runner holds in memory",
        )
        parser.add_argument(
            "--row_group_mb", type=int, default=64,
            help="close a Parquet row group at this many MiB of image data (default 64)",
        )
        parser.add_argument(
            "--codec", default="none", choices=PARQUET_CODECS,
            help="Parquet compression codec (default none: JPEG bytes and pixels barely compress)",
        )
        parser.add_argument(
            "--preview_rows", type=int, default=5,
            help="after the summary, print this many rows of the output (default 5; 0 for none)",
        )
        parser.add_argument(
            "--model", default=None, metavar="PATH",
            help="the ONNX model (a file on any filesystem Beam knows, that you bring): its first input takes a "
                 "batch of images, (N, 3, H, W) or (N, H, W, 3), and its first output gives each image's embedding",
        )
        parser.add_argument(
            "--resize", type=_size, default=None, metavar="S|HxW",
            help="resize on decode (beam_tarimg.Resize): S for the shorter side (--resize_mode shorter), or HxW. "
                 "Without it every image keeps its decoded size",
        )
        parser.add_argument("--crop", type=_size, default=None, metavar="S|HxW",
                            help="after --resize, centre-crop to SxS or HxW (e.g. --resize 256 --crop 224)")
        parser.add_argument("--resize_mode", default="shorter", choices=RESIZE_MODES,
                            help="shorter: shorter side to --resize, keeping the aspect ratio (default); "
                                 "letterbox: fit inside HxW and pad; stretch: exactly HxW")
        parser.add_argument("--interpolation", default="linear", choices=INTERPOLATIONS,
                            help="resize filter, antialiased (default linear; CLIP uses cubic)")
        parser.add_argument("--mean", type=_floats, default=None, metavar="M|R,G,B",
                            help="subtract this per channel, on the 0-255 scale (CLIP: 122.770938,116.7460125,"
                                 "104.09373615)")
        parser.add_argument("--std", type=_floats, default=None, metavar="S|R,G,B",
                            help="then divide by this per channel, on the 0-255 scale (CLIP: 68.5005327,"
                                 "66.6321579,70.32316305)")
        parser.add_argument("--layout", default="CHW", choices=("CHW", "HWC"),
                            help="the model's input layout: CHW gives (N, 3, H, W) (default), HWC (N, H, W, 3)")
        parser.add_argument("--dtype", default="float32", choices=("float32", "uint8"),
                            help="the model's input type (default float32; uint8: the pixels as decoded, for a "
                                 "model that normalises them itself, without --mean/--std)")


def _size(text: str):
    """``"224"`` -> 224, ``"224x320"`` -> (224, 320) (height x width); every number >= 1."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected S or HxW with whole numbers >= 1, got {text!r}")
    return values[0] if len(values) == 1 else tuple(values)


def _floats(text: str):
    """``"0.5"`` or ``"122.8,116.7,104.1"`` -> a tuple of one or three finite floats."""
    import math

    try:
        values = tuple(float(p) for p in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in (1, 3) or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected one number or three separated by commas, got {text!r}")
    return values


class _SomeFlags:
    """Passes ``add_argument`` on to ``parser`` for the flags whose dest is in ``names`` only: those in
    ``REQUIRED`` as required flags (listed first, in a group of their own), with the job's own ``helps``."""

    def __init__(self, parser: argparse.ArgumentParser, names: Sequence[str], helps: Mapping[str, str]):
        self._parser = parser
        self._names = frozenset(names)
        self._helps = dict(helps)
        self._required = parser.add_argument_group("required flags")

    def add_argument(self, *option_strings, **kwargs):
        name = option_strings[0].lstrip("-")
        if name not in self._names:
            return
        kwargs["help"] = self._helps.get(name, kwargs.get("help"))
        if name in REQUIRED:
            self._required.add_argument(*option_strings, required=True, **kwargs)
        else:
            self._parser.add_argument(*option_strings, **kwargs)


def __getattr__(name):
    if name == "TarImagesOptions":  # a PipelineOptions subclass, made (and Beam imported) on first use
        from apache_beam.options.pipeline_options import PipelineOptions

        cls = type("TarImagesOptions", (_TarImagesFlags, PipelineOptions), {"__module__": __name__})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_job_flags(parser, helps: Mapping[str, str] = {}) -> None:
    """The flags of how a job runs (not of what it reads or writes)."""
    parser.add_argument(
        "--overwrite", action="store_true", default=False,
        help=helps.get("overwrite", "remove the files of an earlier run first (the output's shards and beam-temp-* "
                       "folders, the failures file); without it a job refuses to start where they exist"),
    )
    parser.add_argument(
        "--quiet", action="store_true", default=False,
        help="no progress display on stderr (shown on local runners: a bar on a terminal, else a line every "
             "10 s, or every BEAM_TARIMG_PROGRESS_INTERVAL seconds)",
    )


class _Parser(argparse.ArgumentParser):
    """argparse, with errors raised as UsageError instead of printing the usage and exiting."""

    def error(self, message):
        raise UsageError(message)


def parse_args(argv: Optional[Sequence[str]], prog: str, description: str,
               flags: Optional[Sequence[str]] = None,
               helps: Mapping[str, str] = {}) -> Tuple[argparse.Namespace, List[str]]:
    """Our flags (those named in ``flags``, default all; ``helps``: the job's own help texts), and the Beam
    flags (with ``--runner`` defaulted to FnApiRunner). Raises UsageError. Imports no Beam: the Beam flags are
    checked against Beam's option definitions read from its source (``beam_flag_parser``); ``args.runner`` is
    the runner's name.

    ``--help`` prints the job's flags and exits with code 0. The flags a job does not take are usage errors
    on its command line and keep their defaults in the returned namespace.
    """
    parser = _Parser(prog=prog, description=description, epilog=_BEAM_FLAGS_EPILOG, allow_abbrev=False)
    _TarImagesFlags._add_argparse_args(_SomeFlags(parser, PARQUET_FLAGS if flags is None else flags, helps))
    add_job_flags(parser, helps)
    args, beam_args = parser.parse_known_args(list(argv) if argv is not None else None)
    every_flag = argparse.ArgumentParser(add_help=False)
    _TarImagesFlags._add_argparse_args(every_flag)
    for name, default in vars(every_flag.parse_args([])).items():
        args.__dict__.setdefault(name, default)
    _check_values(args)
    beam_parser = beam_flag_parser()
    if beam_parser is None:  # Beam's source unreadable (a zipped install): ask Beam itself
        _check_beam_flags(beam_args)
        runner = runner_name(beam_args)
    else:
        runner = _parse_beam_flags(beam_parser, beam_args).runner
    runner = runner or DEFAULT_RUNNER
    if runner.lower() in _FULL_RUNNER_NAMES:  # the name Beam gets; the summary keeps the user's
        beam_args = [*beam_args, f"--runner={_FULL_RUNNER_NAMES[runner.lower()]}"]  # the last --runner wins
    args.runner = runner
    return args, beam_args


def beam_flag_parser() -> Optional[argparse.ArgumentParser]:
    """A parser of Beam's pipeline option flags (names, whether they take a value, int/float types and choices),
    built from ``apache_beam/options/pipeline_options.py``'s source without importing Beam (the import alone
    takes 1.5-6 s on a busy machine, and a usage error must come back at once); None if that file cannot be
    read. ``tests/test_pipelines.py`` checks that it knows exactly the flags Beam's own option classes define."""
    import ast
    import importlib.util

    try:
        spec = importlib.util.find_spec("apache_beam")  # finds the package without importing it
        path = os.path.join(os.path.dirname(spec.origin), "options", "pipeline_options.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
    except (AttributeError, ImportError, OSError, SyntaxError, TypeError, ValueError):
        return None
    parser = _Parser(add_help=False, allow_abbrev=False)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("add_argument", "add_value_provider_argument")):
            continue
        names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        if not names or not all(n.startswith("-") for n in names):
            continue
        kwargs = {}
        for keyword in node.keywords:
            value = keyword.value
            if keyword.arg == "action" and isinstance(value, ast.Constant) and value.value in (
                    "store_true", "store_false"):
                kwargs["action"] = "store_true"  # either way: takes no value
            elif keyword.arg == "nargs" and isinstance(value, ast.Constant):
                kwargs["nargs"] = value.value
            elif keyword.arg == "type" and isinstance(value, ast.Name) and value.id in ("int", "float"):
                kwargs["type"] = {"int": int, "float": float}[value.id]
            elif keyword.arg == "choices":
                try:
                    kwargs["choices"] = ast.literal_eval(value)
                except ValueError:
                    pass
        try:
            parser.add_argument(*names, **kwargs)
        except argparse.ArgumentError:  # a flag defined twice: the first definition holds
            pass
    return parser


def _parse_beam_flags(parser: argparse.ArgumentParser, beam_args: List[str]) -> argparse.Namespace:
    namespace, unknown = parser.parse_known_args(beam_args)
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
    return namespace


def is_local_runner(runner: str) -> bool:
    """``beam_tarimg.transforms.is_local_runner`` without importing Beam (a test checks that they agree)."""
    return runner.rsplit(".", 1)[-1].lower() in LOCAL_RUNNERS


LOCAL_RUNNERS = frozenset(
    name.lower()
    for name in ("DirectRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner", "FnApiRunner", "PrismRunner",
                 "TestDirectRunner", "InteractiveRunner")
)


def _check_beam_flags(beam_args: List[str]) -> None:
    """Every flag must be known to one of Beam's option classes (Beam itself would only log a warning)."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    class _BeamFlagsParser(_BeamArgumentParser):
        def error(self, message):
            raise UsageError(message)

    parser = _BeamFlagsParser(allow_abbrev=False)
    seen = set()
    for cls in PipelineOptions.__subclasses__():
        if issubclass(cls, _TarImagesFlags) or str(cls) in seen:
            continue
        seen.add(str(cls))
        cls._add_argparse_args(parser)
    _, unknown = parser.parse_known_args(beam_args)
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")


def resize_option(args: argparse.Namespace, **model_input) -> Dict[str, object]:
    """``{"resize": beam_tarimg.Resize(...)}`` for ``ReadAllImagesFromTars`` from ``--resize``, ``--crop``,
    ``--resize_mode`` and ``--interpolation``, or ``{}`` without ``--resize``; ``model_input`` adds Resize's
    ``dtype``, ``layout``, ``mean`` and ``std`` (``pipelines.embed``; the writing jobs get uint8 HWC, what their
    sinks write). Raises UsageError for what Resize refuses. Imports no Beam."""
    if args.resize is None:
        return {}
    from beam_tarimg.resize import Resize

    try:
        return {"resize": Resize(args.resize, crop=args.crop, mode=args.resize_mode,
                                 interpolation=args.interpolation, **model_input)}
    except ValueError as e:
        raise UsageError(f"--resize: {e}") from None


def _check_values(args: argparse.Namespace) -> None:
    for flag, minimum in (("batch_size", 1), ("num_threads", 1), ("num_shards", 0), ("row_group_mb", 1),
                          ("preview_rows", 0)):
        value = getattr(args, flag)
        if value is not None and value < minimum:
            raise UsageError(f"argument --{flag}: must be >= {minimum}, got {value}")
    if not 1 <= args.jpeg_quality <= 100:
        raise UsageError(f"argument --jpeg_quality: must be in [1, 100], got {args.jpeg_quality}")
    if args.std is not None and min(args.std) <= 0:
        raise UsageError(f"argument --std: must be > 0, got {','.join(map(str, args.std))}")
    if args.dtype == "uint8" and (args.mean is not None or args.std is not None):
        raise UsageError("--mean and --std need --dtype float32")
    if args.crop is not None and args.resize is None:
        raise UsageError("--crop needs --resize (e.g. --resize 256 --crop 224)")
    if args.image_format is None:  # not given: the JPEG's own bytes, or with --resize its resized pixels as PNG
        args.image_format = DEFAULT_IMAGE_FORMAT if args.resize is None else PNG
    elif args.resize is not None and args.image_format == ORIGINAL:
        raise UsageError("--image_format original stores each JPEG's own bytes, not the resized pixels: with "
                         "--resize use png (its default), raw or jpeg")
    if args.row_group_mb > 1024:
        raise UsageError(f"argument --row_group_mb: must be at most 1024, got {args.row_group_mb}")
    try:
        args.extensions = normalize_extensions(args.extensions)
    except ValueError as e:
        raise UsageError(f"argument --extensions: {e}") from None


def runner_name(beam_args: List[str]) -> str:
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    runner = PipelineOptions(beam_args).view_as(StandardOptions).runner
    return runner if isinstance(runner, str) else type(runner).__name__


def check_writable(path: str, flag: str) -> None:
    """Creates (and deletes) a probe file where ``path`` will be written; raises UsageError if that fails.

    The probe holds a few bytes: Beam's S3 filesystem cannot write an empty file (it completes a multipart
    upload with no part, which S3 rejects as MalformedXML)."""
    if not path:
        raise UsageError(f"{flag} is required")
    if "://" not in path:  # a local path: no Beam needed
        directory = path if path.endswith(os.sep) else os.path.dirname(path)
        probe = os.path.join(directory or ".", f".beam-tarimg-probe-{uuid.uuid4().hex}")
        try:
            if directory:
                os.makedirs(directory, exist_ok=True)  # as Beam's local filesystem does
            with open(probe, "wb") as f:
                f.write(b"beam-tarimg write probe\n")
            os.remove(probe)
        except OSError as e:  # permissions, a file where a directory should be
            raise UsageError(f"{flag} {path!r} is not writable: {type(e).__name__}: {e}") from None
        return
    from apache_beam.io.filesystems import FileSystems

    try:
        directory = path if path.endswith("/") else FileSystems.split(path)[0]
        probe = FileSystems.join(directory, f".beam-tarimg-probe-{uuid.uuid4().hex}") if directory else (
            f".beam-tarimg-probe-{uuid.uuid4().hex}"
        )
        with FileSystems.create(probe) as f:
            f.write(b"beam-tarimg write probe\n")
        FileSystems.delete([probe])
    except Exception as e:  # any filesystem: permissions, a file where a directory should be, no such bucket
        raise UsageError(f"{flag} {path!r} is not writable: {type(e).__name__}: {e}") from None


def check_beam_flags(beam_args: List[str]) -> None:
    """Beam's own check of its flags (imports Beam); ``parse_args`` already did the same from Beam's source."""
    _check_beam_flags(beam_args)


def check_local_input(path: str) -> None:
    """Raises UsageError when a local ``--input`` certainly matches no file, deciding without Beam: a path
    without wildcards that does not exist, a folder without a ``*.tar`` entry, a glob whose folder does not
    exist or holds no name it matches (wildcards ``*`` and ``?`` in the last part only). Anything else is left
    to Beam's match, which has the last word."""
    import fnmatch

    pattern = path + "*.tar" if path.endswith(os.sep) else (
        os.path.join(path, "*.tar") if os.path.isdir(path) else path)
    folder, name = os.path.split(pattern)
    if "[" in pattern or any(c in folder for c in "*?"):
        return
    no_match = UsageError(f"--input: no files match {pattern!r}")
    if not any(c in name for c in "*?"):
        if not os.path.lexists(pattern):
            raise no_match
        return
    try:
        names = os.listdir(folder or ".")
    except FileNotFoundError:
        raise no_match from None
    except OSError:
        return
    if not any(fnmatch.fnmatchcase(n, name) for n in names):
        raise no_match


S3_ENDPOINT_FLAGS = "--s3_endpoint_url URL (with --s3_access_key_id, --s3_secret_access_key, --s3_region_name)"
_REACH_TIMEOUT_S = 10.0


def check_reachable(paths: Sequence[Tuple[str, Optional[str]]], beam_args: List[str]) -> None:
    """For ``s3://`` paths (``(flag, path)`` pairs): the S3 endpoint the job would use (``--s3_endpoint_url``,
    else boto3's own choice: AWS, or ``AWS_ENDPOINT_URL_S3``...) accepts a TCP connection within ~10 s, else
    UsageError naming the endpoint flags. Without this, Beam's S3 client retries an unreachable endpoint for
    minutes, logging a traceback at each retry."""
    flag, path = next(((f, p) for f, p in paths if p and p.startswith("s3://")), (None, None))
    if path is None:
        return
    parser = beam_flag_parser()
    namespace = parser.parse_known_args(beam_args)[0] if parser is not None else argparse.Namespace()
    endpoint = getattr(namespace, "s3_endpoint_url", None)
    if not endpoint:
        try:
            import boto3

            # Credentials given, so that making the client asks no credential provider (an instance metadata
            # service would be a network request): only the endpoint is wanted, resolved as Beam's client will.
            endpoint = boto3.session.Session().client(
                "s3", region_name=getattr(namespace, "s3_region_name", None) or "us-east-1",
                aws_access_key_id="unused", aws_secret_access_key="unused").meta.endpoint_url
        except Exception:  # no boto3 (Beam's S3 filesystem then says what to install), or no endpoint found
            return
    from urllib.parse import urlsplit

    url = urlsplit(endpoint if "://" in endpoint else "https://" + endpoint)
    try:
        host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    except ValueError as e:
        raise UsageError(f"--s3_endpoint_url {endpoint!r}: {e}") from None
    import urllib.request

    proxy = urllib.request.getproxies().get(url.scheme)  # boto3 goes through HTTP(S)_PROXY: probe that instead
    if proxy and not urllib.request.proxy_bypass(host):
        endpoint = f"{endpoint} through the proxy {proxy}"
        proxy_url = urlsplit(proxy if "://" in proxy else "http://" + proxy)
        host, port = proxy_url.hostname, proxy_url.port or (443 if proxy_url.scheme == "https" else 80)
    error = _connect_error(host, port)
    if error is not None:
        raise UsageError(
            f"{flag} {path!r}: cannot reach the S3 endpoint {endpoint} ({error}); for an S3-compatible store "
            f"pass {S3_ENDPOINT_FLAGS}, or check the network"
        )


def _connect_error(host: Optional[str], port: int) -> Optional[str]:
    """None if ``host:port`` accepts a TCP connection within _REACH_TIMEOUT_S (name lookup included), else why."""
    import socket
    import threading

    if not host:
        return "no host in the URL"
    outcome: List[Optional[str]] = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=_REACH_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=connect, name="beam-tarimg-reach", daemon=True)  # a name lookup can hang
    thread.start()
    thread.join(_REACH_TIMEOUT_S + 1)
    return outcome[0] if outcome else f"no answer in {_REACH_TIMEOUT_S:.0f} s"


class quiet_beam_errors:
    """Drops the ERROR records that Beam's S3 filesystem logs on the root logger (with a whole traceback) just
    before it raises, while the job checks its paths: the job turns the exception into one line."""

    def __init__(self):
        import threading

        self._thread = threading.get_ident()

    def filter(self, record) -> bool:
        import threading

        return not (record.name == "root" and record.levelno >= 40 and threading.get_ident() == self._thread)

    def __enter__(self):
        import logging

        logging.getLogger().addFilter(self)
        return self

    def __exit__(self, *exc):
        import logging

        logging.getLogger().removeFilter(self)
