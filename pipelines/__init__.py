"""Runnable pipelines: webdataset-style tar shards in, Parquet or TFRecord files (or only a summary) out.

    python -m pipelines.tar_to_parquet  --input data/ --output out/images --runner FnApiRunner
    python -m pipelines.tar_to_tfrecord --input 'gs://bucket/shards/*.tar' --output gs://bucket/out/images ...
    python -m pipelines.summarize       --input data/

The flags are ``pipelines.options.TarImagesOptions``, each job taking its own set of them (``--help`` lists
them); every other flag goes to Beam.
This package holds the driver the three share: check the flags and paths, build and run the pipeline, then
print a summary made from the pipeline's Beam metrics.
"""

from __future__ import annotations

import logging


class _DropBeamImportNoise(logging.Filter):
    """Beam logs this on import when the optional GCP client libraries are absent; it concerns BigQuery only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("apitools not found")


# Installed before apache_beam is imported, so that a command-line error stays one line on stderr.
logging.getLogger().addFilter(_DropBeamImportNoise())

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Callable, Dict, List, Optional, Sequence  # noqa: E402

import apache_beam as beam  # noqa: E402
from apache_beam.metrics import Metrics  # noqa: E402
from apache_beam.metrics.metric import MetricsFilter  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from beam_tarimg.decode import cuda_device_count  # noqa: E402
from beam_tarimg.transforms import (  # noqa: E402
    NAMESPACE,
    ReadImagesFromTars,
    is_local_runner,
    match_tars,
    tar_pattern,
)
from beam_tarimg.types import ImageFailure  # noqa: E402
from pipelines.options import (  # noqa: E402
    UsageError,
    check_writable,
    parse_args,
    runner_name,
)

SinkFactory = Callable[[object], beam.PTransform]
PreviewFn = Callable[[str, int], List[str]]


class _FailureToJsonFn(beam.DoFn):
    """An ImageFailure as one JSON line (tar, member, stage, error). Counter: failure_records."""

    def setup(self):
        self._failures = Metrics.counter(NAMESPACE, "failure_records")

    def process(self, failure: ImageFailure):
        self._failures.inc()
        yield json.dumps(failure.to_dict(), ensure_ascii=False)


class _RecordOutputFileFn(beam.DoFn):
    """Records each written file name in the string-set metric files_written."""

    def setup(self):
        self._files = Metrics.string_set(NAMESPACE, "files_written")

    def process(self, file_name):
        self._files.add(str(file_name))


def run_pipeline(
    argv: Optional[Sequence[str]],
    *,
    prog: str,
    description: str,
    make_sink: Optional[SinkFactory] = None,
    preview: Optional[PreviewFn] = None,
    flags: Optional[Sequence[str]] = None,
) -> Dict[str, object]:
    """Checks the flags (the job's ``flags``; default all) and paths (raising UsageError before any work),
    runs, prints and returns the summary."""
    args, beam_args = parse_args(argv, prog, description, flags)
    if not args.input:
        raise UsageError("--input is required: a glob or a directory of .tar files")
    if make_sink is not None and not args.output:
        raise UsageError("--output is required: the path prefix of the output files")
    runner = runner_name(beam_args)
    if args.device == "gpu" and is_local_runner(runner) and cuda_device_count() == 0:
        raise UsageError("--device gpu: no CUDA device is visible on this machine; use --device auto or cpu")
    pattern = tar_pattern(args.input)
    try:
        read = ReadImagesFromTars(
            pattern,
            validate=False,
            batch_size=args.batch_size,
            num_threads=args.num_threads,
            device=args.device,
            extensions=args.extensions,
            include_metadata=args.include_metadata,
        ).with_failures()
        sink = make_sink(args) if make_sink is not None else None
        pipeline = beam.Pipeline(options=PipelineOptions(beam_args))
    except (ValueError, ImportError) as e:
        raise UsageError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    # Touch the filesystems last: matching may list a bucket, and the write probes create directories.
    try:
        match_tars(pattern)
    except ValueError as e:
        raise UsageError(f"--input: {e}") from None
    if sink is not None:
        check_writable(args.output, "--output")
    if args.failures:
        if "://" not in args.failures and os.path.isdir(args.failures):
            raise UsageError(f"--failures {args.failures!r} is a directory; give a file path")
        check_writable(args.failures, "--failures")

    batches, failures = pipeline | "ReadImagesFromTars" >> read
    if sink is not None:
        written = batches | "WriteImages" >> sink
        _ = written | "RecordOutputFiles" >> beam.ParDo(_RecordOutputFileFn())
    lines = failures | "FailuresToJson" >> beam.ParDo(_FailureToJsonFn())
    if args.failures:
        _ = lines | "WriteFailures" >> beam.io.WriteToText(args.failures, shard_name_template="")

    start = time.perf_counter()
    result = pipeline.run()
    result.wait_until_finish()
    seconds = time.perf_counter() - start

    summary = _summary(result, seconds, runner, pattern, args, wrote=sink is not None)
    print_summary(prog, summary)
    if preview is not None and args.preview_rows and summary["output_files"]:
        first = summary["output_files"][0]
        print(f"\nfirst rows of {first}:")
        for line in preview(first, args.preview_rows):
            print(line)
    sys.stdout.flush()
    return summary


def _query(result) -> tuple:
    """(counters by name, string sets by name) of the beam_tarimg namespace, summed over steps."""
    metrics = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    counters: Dict[str, int] = {}
    for r in metrics.get("counters", []):
        value = r.committed if r.committed is not None else r.attempted
        counters[r.key.metric.name] = counters.get(r.key.metric.name, 0) + int(value or 0)
    string_sets: Dict[str, set] = {}
    for r in metrics.get("string_sets", []):
        value = r.committed if r.committed is not None else r.attempted
        string_sets.setdefault(r.key.metric.name, set()).update(value or ())
    return counters, string_sets


def _summary(result, seconds: float, runner: str, pattern: str, args, wrote: bool) -> Dict[str, object]:
    counters, string_sets = _query(result)
    decoded = sum(counters.get(f"images_decoded_{kind}", 0) for kind in ("cpu", "gpu", "fallback"))
    images = counters.get("images_written", 0) if wrote else decoded
    return {
        "runner": runner,
        "input": pattern,
        "output": args.output if wrote else None,
        "output_files": sorted(string_sets.get("files_written", ())),
        "failures_path": args.failures,
        "tars": counters.get("tars_read", 0),
        "tars_failed": counters.get("tars_failed", 0),
        "tars_corrupt": counters.get("tars_corrupt", 0),
        "images_decoded": decoded,
        "images_written": counters.get("images_written", 0) if wrote else 0,
        "images_failed": counters.get("images_failed", 0),
        "failures": counters.get("failure_records", 0),
        "members_skipped": counters.get("members_skipped", 0),
        "decoder_crashes": counters.get("decoder_crashes", 0),
        "seconds": round(seconds, 3),
        "images_per_second": round(images / seconds, 1) if seconds > 0 else 0.0,
        "counters": counters,
    }


def print_summary(prog: str, s: Dict[str, object]) -> None:
    wrote = s["output"] is not None
    what = "images written" if wrote else "images decoded"
    count = s["images_written"] if wrote else s["images_decoded"]
    print(f"{prog}: done in {s['seconds']:.1f} s on {s['runner']}")
    print(f"  input            {s['input']}")
    print(f"  tars read        {s['tars']} ({s['tars_corrupt']} of them corrupt or cut off)")
    if s["tars_failed"]:
        print(f"  tars not opened  {s['tars_failed']}")
    print(f"  {what:<16} {count} ({s['images_per_second']} images/s)")
    print(f"  failures         {s['failures']} ({s['images_failed']} images lost)")
    print(f"  members skipped  {s['members_skipped']}")
    if s["decoder_crashes"]:
        print(f"  decoder crashes  {s['decoder_crashes']} (contained: each cost at most the image that caused it)")
    if wrote:
        files = s["output_files"]
        where = files[0] if len(files) == 1 else f"{s['output']}* ({len(files)} files)"
        print(f"  output           {where}")
    if s["failures_path"]:
        print(f"  failures file    {s['failures_path']}")


def preview_lines(rows: List[dict]) -> List[str]:
    """rows of {id, path, shape, metadata} as aligned text lines."""
    table = [("image_id", "image_path", "shape", "metadata")]
    for row in rows:
        meta = row["metadata"]
        table.append((row["id"], row["path"], row["shape"], meta if len(meta) <= 70 else meta[:67] + "..."))
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    return ["  " + "  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in table]


def main_for(run: Callable[[Optional[Sequence[str]]], Dict[str, object]], prog: str) -> None:
    """Runs ``run(None)``; a UsageError becomes one line on stderr and exit code 2."""
    try:
        run(None)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(0)
