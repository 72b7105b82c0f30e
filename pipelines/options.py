"""The command-line options shared by the runnable pipelines, and their checks before any work is done.

``TarImagesOptions`` is a Beam ``PipelineOptions`` subclass: its flags travel with the pipeline options like any
Beam flag. It defines the flags of every job; each job takes only its own set (``SUMMARIZE_FLAGS``,
``TFRECORD_FLAGS``, ``PARQUET_FLAGS``), so its ``--help`` lists only those and the others are usage errors. Every flag it does not define is handed to Beam (``--runner``, ``--direct_num_workers``,
``--direct_running_mode``, ``--temp_location``, ...); a flag that neither knows is a usage error.

Beam parses the flags of every ``PipelineOptions`` subclass it has seen whenever it reads options, so these
flags have no ``required=True`` (that would break every other pipeline in the process) and other modules
should reuse this class rather than define another ``--input`` or ``--output``.

This module imports Apache Beam only when it needs it: ``--help`` and errors in our own flags come back
without it (Beam's import alone takes seconds on a busy machine). ``TarImagesOptions`` is made on first
access; a job's own run never makes it, so its flags do not travel to the workers (whose Beam would log them
as unparseable). ``--overwrite`` and ``--quiet`` (``add_job_flags``) say how a job runs, not what its
pipeline does, and are not pipeline options.
"""

from __future__ import annotations

import argparse
import uuid
from typing import List, Optional, Sequence, Tuple

from beam_tarimg.decode import DEVICES
from beam_tarimg.schema import DEFAULT_IMAGE_FORMAT, IMAGE_FORMATS, PARQUET_CODECS
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


# The flags of each job, by dest name.
SUMMARIZE_FLAGS = ("input", "batch_size", "num_threads", "device", "extensions", "include_metadata", "failures")
TFRECORD_FLAGS = SUMMARIZE_FLAGS + ("output", "image_format", "jpeg_quality", "num_shards", "preview_rows")
PARQUET_FLAGS = TFRECORD_FLAGS + ("row_group_mb", "codec")


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
                 "in it), on any filesystem Beam knows. Required.",
        )
        parser.add_argument(
            "--output", default=None,
            help="path prefix of the output files, e.g. out/images gives out/images-00000-of-00004.parquet. "
                 "Required by tar_to_parquet and tar_to_tfrecord.",
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
            "--image_format", default=DEFAULT_IMAGE_FORMAT, choices=IMAGE_FORMATS,
            help="how images are stored: original (default: each JPEG's own bytes, unchanged; about the size of "
                 "the input), raw (decoded HxWxC uint8 pixels, ~13x the input), png (lossless re-encode, ~5x, slow) "
                 "or jpeg (lossy re-encode)",
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


class _SomeFlags:
    """Passes ``add_argument`` on to ``parser`` for the flags whose dest is in ``names`` only."""

    def __init__(self, parser: argparse.ArgumentParser, names: Sequence[str]):
        self._parser = parser
        self._names = frozenset(names)

    def add_argument(self, *option_strings, **kwargs):
        if option_strings[0].lstrip("-") in self._names:
            self._parser.add_argument(*option_strings, **kwargs)


def __getattr__(name):
    if name == "TarImagesOptions":  # a PipelineOptions subclass, made (and Beam imported) on first use
        from apache_beam.options.pipeline_options import PipelineOptions

        cls = type("TarImagesOptions", (_TarImagesFlags, PipelineOptions), {"__module__": __name__})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_job_flags(parser) -> None:
    """The flags of how a job runs (not of what it reads or writes)."""
    parser.add_argument(
        "--overwrite", action="store_true", default=False,
        help="remove the files of an earlier run first (the output's shards and beam-temp-* folders, the "
             "failures file); without it a job refuses to start where they exist",
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
               flags: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, List[str]]:
    """Our flags (those named in ``flags``, default all), and the Beam flags (with ``--runner`` defaulted to
    FnApiRunner). Raises UsageError.

    ``--help`` prints the job's flags and exits with code 0. The flags a job does not take are usage errors
    on its command line and keep their defaults in the returned namespace.
    """
    parser = _Parser(prog=prog, description=description, epilog=_BEAM_FLAGS_EPILOG, allow_abbrev=False)
    _TarImagesFlags._add_argparse_args(parser if flags is None else _SomeFlags(parser, flags))
    add_job_flags(parser)
    args, beam_args = parser.parse_known_args(list(argv) if argv is not None else None)
    every_flag = argparse.ArgumentParser(add_help=False)
    _TarImagesFlags._add_argparse_args(every_flag)
    for name, default in vars(every_flag.parse_args([])).items():
        args.__dict__.setdefault(name, default)
    _check_values(args)  # before Beam is imported: our own flags' errors come back at once
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    _check_beam_flags(beam_args)
    runner = PipelineOptions(beam_args).view_as(StandardOptions).runner
    if runner is None:
        beam_args = [*beam_args, f"--runner={DEFAULT_RUNNER}"]
        runner = DEFAULT_RUNNER
    if isinstance(runner, str) and runner.lower() in _FULL_RUNNER_NAMES:
        beam_args = [*beam_args, f"--runner={_FULL_RUNNER_NAMES[runner.lower()]}"]  # the last --runner wins
    return args, beam_args


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


def _check_values(args: argparse.Namespace) -> None:
    for flag, minimum in (("batch_size", 1), ("num_threads", 1), ("num_shards", 0), ("row_group_mb", 1),
                          ("preview_rows", 0)):
        value = getattr(args, flag)
        if value is not None and value < minimum:
            raise UsageError(f"argument --{flag}: must be >= {minimum}, got {value}")
    if not 1 <= args.jpeg_quality <= 100:
        raise UsageError(f"argument --jpeg_quality: must be in [1, 100], got {args.jpeg_quality}")
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
