"""Runnable pipelines: webdataset-style tar shards in, Parquet or TFRecord files (or only a summary) out.

    python -m pipelines.tar_to_parquet  --input data/ --output out/images --runner FnApiRunner
    python -m pipelines.tar_to_tfrecord --input 'gs://bucket/shards/*.tar' --output gs://bucket/out/images ...
    python -m pipelines.summarize       --input data/
    python -m pipelines.embed           --input data/ --output out/embeddings --model model.onnx

The flags are ``pipelines.options.TarImagesOptions``, each job taking its own set of them (``--help`` lists
them); every other flag goes to Beam.
This package holds the driver they share: check the flags and paths, build and run the pipeline, then
print a summary made from the pipeline's Beam metrics.
"""

from __future__ import annotations

import logging


class _DropBeamNoise(logging.Filter):
    """Drops Beam log lines that concern nothing a user of these jobs did or can act on:

    - ``apitools not found``: logged on import when the GCP client libraries are absent; BigQuery only.
    - the SDK workers of ``--direct_running_mode multi_processing`` (relayed by the local job service):
      ``Discarding unparseable args``, because a worker knows only Beam's own option classes (it lists Beam's
      ``--direct_runner_use_stacked_bundle`` beside our flags; the driver has checked every flag before the
      run), and ``No semi_persistent_directory found``, which concerns staged files that local runs have none of.
    - ``No shards found to finalize``: Beam's file sink with ``skip_if_empty``, i.e. no failures, no file.
    - ``Resource module is not available``: Beam 2.77's RunInference (``pipelines.embed``) logs it for every
      batch when PyTorch is not installed (its model manager's import fails, taking ``resource`` with it).
    """

    _WORKER_NOISE = ("Discarding unparseable args", "No semi_persistent_directory found",
                     "No shards found to finalize")

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith(("apitools not found", "Resource module is not available")):
            return False
        if record.name.startswith(("apache_beam.runners.portability", "apache_beam.io.filebasedsink")) and any(
            noise in message or any(noise in str(a) for a in (record.args or ())) for noise in self._WORKER_NOISE
        ):
            return False
        return True


# Installed before apache_beam is imported, so that a command-line error stays one line on stderr. Handlers
# get it too: a filter on the root logger does not see records propagated from Beam's own loggers.
_NOISE_FILTER = _DropBeamNoise()
logging.getLogger().addFilter(_NOISE_FILTER)
logging.getLogger("apache_beam").addFilter(_NOISE_FILTER)
for _name in ("apache_beam.runners.portability.local_job_service", "apache_beam.io.filebasedsink"):
    logging.getLogger(_name).addFilter(_NOISE_FILTER)

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Callable, Dict, List, Optional, Sequence  # noqa: E402

from beam_tarimg.types import FailureStage  # noqa: E402  (Beam-free)
from pipelines import progress, supervise  # noqa: E402  (Beam-free)
from pipelines import outputs  # noqa: E402  (Beam-free for local paths)
from pipelines.options import (  # noqa: E402  (Beam-free)
    UsageError,
    check_local_input,
    check_reachable,
    check_writable,
    is_local_runner,
    parse_args,
    quiet_beam_errors,
)

# Exit codes of the jobs (README, --help).
EXIT_OK = 0
EXIT_FAILED = 1  # the pipeline raised
EXIT_USAGE = 2  # a user error found before any work: a bad flag, no input, an unwritable or existing output
EXIT_NOTHING_WRITTEN = 3  # tars matched, but not one image was written (or decoded, for summarize)
EXIT_SIGINT = supervise.EXIT_SIGINT  # 130: interrupted with Ctrl-C / SIGINT; partial outputs removed
EXIT_SIGTERM = supervise.EXIT_SIGTERM  # 143: terminated with SIGTERM; partial outputs removed

SinkFactory = Callable[[object], "beam.PTransform"]
PreviewFn = Callable[[str, int], List[str]]


def run_pipeline(
    argv: Optional[Sequence[str]],
    *,
    prog: str,
    description: str,
    make_sink: Optional[SinkFactory] = None,
    preview: Optional[PreviewFn] = None,
    flags: Optional[Sequence[str]] = None,
    helps: Optional[Dict[str, str]] = None,
    read_options: Optional[Callable[[object], Dict[str, object]]] = None,
) -> Dict[str, object]:
    """Checks the flags (the job's ``flags``, default all, with the job's ``helps``) and paths (raising
    UsageError before any work; before importing Beam where they are local), runs, prints and returns the
    summary.

    ``make_sink(args)`` gives the transform that writes the ``ImageBatch``es: its output is the written file
    names, or ``(file names, failures)`` for a sink that can lose images too (``pipelines.embed``: those the
    model refused), whose failures join the read's. ``read_options(args)``, called after the flags' checks and
    before Beam is imported (it may raise UsageError), gives more options for ``ReadAllImagesFromTars``.

    The summary's ``exit_code`` is 0, or ``EXIT_NOTHING_WRITTEN`` when tars matched but no image came out
    (``main_for`` exits with it after printing the failures by stage to stderr).
    """
    args, beam_args = parse_args(argv, prog, description, flags, helps or {})
    # Every check that needs no filesystem but the local one comes before Beam is imported (seconds).
    runner = args.runner
    local = is_local_runner(runner)
    if not args.input:
        raise UsageError("--input is required: a glob or a directory of .tar files")
    if make_sink is not None and not args.output:
        raise UsageError("--output is required: the path prefix of the output files")
    if args.device == "gpu" and local:
        from beam_tarimg.decode import cuda_device_count

        if cuda_device_count() == 0:
            raise UsageError("--device gpu: no CUDA device is visible on this machine; use --device auto or cpu")
    if make_sink is not None and args.num_shards and local:
        raise UsageError(
            f"--num_shards {args.num_shards}: on a local runner ({runner}) Beam's fixed sharding groups every "
            "row by shard in memory (the whole output); leave it out to get one file per bundle, or run on a "
            "distributed runner"
        )
    output = args.output if make_sink is not None else None
    if outputs.is_local(args.input):
        check_local_input(args.input)
    if args.failures and outputs.is_local(args.failures) and os.path.isdir(args.failures):
        raise UsageError(f"--failures {args.failures!r} is a directory; give a file path")
    extra_read_options = read_options(args) if read_options is not None else {}
    check_reachable([("--input", args.input), ("--output", output), ("--failures", args.failures)], beam_args)
    remote = not all(outputs.is_local(p) for p in (output, args.failures) if p)
    if not remote:
        existing = _refuse_earlier_run(output, args)
        if output:
            check_writable(output, "--output")
        if args.failures:
            check_writable(args.failures, "--failures")

    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_tarimg.transforms import MatchTars, ReadAllImagesFromTars, match_tars, tar_pattern
    from pipelines import steps
    from pipelines.options import check_beam_flags

    check_beam_flags(beam_args)  # Beam's own parser has the last word on its flags
    pattern = tar_pattern(args.input)
    try:
        read = ReadAllImagesFromTars(
            batch_size=args.batch_size,
            num_threads=args.num_threads,
            device=args.device,
            extensions=args.extensions,
            include_metadata=args.include_metadata,
            **extra_read_options,
        ).with_failures()
        sink = make_sink(args) if make_sink is not None else None
        pipeline = beam.Pipeline(options=PipelineOptions(beam_args))
    except (ValueError, ImportError) as e:
        raise UsageError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    FileSystems.set_options(PipelineOptions(beam_args))  # the job's S3 endpoint and keys, for the checks below
    # Touch the filesystems last: matching may list a bucket, and the write probes create directories.
    try:
        with quiet_beam_errors():
            matched = match_tars(pattern)
    except ValueError as e:
        raise UsageError(f"--input: {e}") from None
    if remote:
        with quiet_beam_errors():  # Beam's S3 filesystem logs a traceback before it raises
            existing = _refuse_earlier_run(output, args)
            if output:
                check_writable(output, "--output")
            if args.failures:
                check_writable(args.failures, "--failures")
    if existing:
        outputs.remove(existing)
    # From here on this job writes: a supervising parent removes what it wrote if it is interrupted.
    supervise.announce_outputs(output, args.failures, beam_args)

    tars = (
        pipeline
        | "MatchTars" >> MatchTars(pattern)
        | "SpreadTars" >> beam.Reshuffle()
        | "ReportTarsDone" >> beam.ParDo(steps.TarDoneFn())
    )
    batches, failures = tars | "ReadImagesFromTars" >> read
    batches = batches | "ReportImages" >> beam.ParDo(steps.CountImagesFn())
    if sink is not None:
        written = batches | "WriteImages" >> sink
        if isinstance(written, tuple):  # a sink that loses images too: its failures join the read's
            written, sink_failures = written
            failures = (failures, sink_failures) | "MergeFailures" >> beam.Flatten()
        _ = written | "RecordOutputFiles" >> beam.ParDo(steps.RecordOutputFileFn())
    lines = failures | "FailuresToJson" >> beam.ParDo(steps.FailureToJsonFn())
    if args.failures:
        # No failures, no file: Beam's S3 filesystem cannot write an empty file (a multipart upload of no part).
        _ = lines | "WriteFailures" >> beam.io.WriteToText(args.failures, shard_name_template="", skip_if_empty=True)

    start = time.perf_counter()
    with progress.ProgressDisplay(prog, len(matched), enabled=local and not args.quiet):
        result = pipeline.run()
        result.wait_until_finish()
    seconds = time.perf_counter() - start

    summary = _summary(result, seconds, runner, pattern, args, wrote=sink is not None)
    summary["tars_matched"] = len(matched)
    images = summary["images_written"] if sink is not None else summary["images_decoded"]
    summary["exit_code"] = EXIT_NOTHING_WRITTEN if images == 0 else EXIT_OK
    if images == 0 and summary["output_files"]:
        # Shards without a row (Beam's Parquet sink writes one per bundle even then): an all-failed run leaves
        # only its failures file, and the next run needs no --overwrite because of them.
        outputs.remove(summary["output_files"])
        summary["output_files"] = []
    supervise.announce_done()
    print_summary(prog, summary)
    if preview is not None and args.preview_rows and summary["output_files"]:
        first = summary["output_files"][0]
        print(f"\nfirst rows of {first}:")
        for line in preview(first, args.preview_rows):
            print(line)
    sys.stdout.flush()
    return summary


def _refuse_earlier_run(output: Optional[str], args) -> List[str]:
    """The files of an earlier run at ``output`` and ``--failures``; UsageError if any exist without
    ``--overwrite``."""
    existing = outputs.job_files(output, args.failures)
    if existing and not args.overwrite:
        raise UsageError(
            f"{len(existing)} files of an earlier run exist ({outputs.describe(existing)}); "
            "give --overwrite to remove them first, or another --output / --failures"
        )
    return existing


def _query(result) -> tuple:
    """(counters by name, string sets by name) of the beam_tarimg namespace, summed over steps."""
    from apache_beam.metrics.metric import MetricsFilter

    from beam_tarimg.transforms import NAMESPACE

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
        "images_failed": counters.get("images_failed", 0) + counters.get("images_failed_inference", 0),
        "failures": counters.get("failure_records", 0),
        "members_skipped": counters.get("members_skipped", 0),
        "decoder_crashes": counters.get("decoder_crashes", 0),
        "failures_by_stage": {stage: counters[f"failures_{stage}"] for stage in _stages(counters)
                              if counters.get(f"failures_{stage}")},
        "failure_examples": _examples(string_sets.get("failure_examples", ())),
        "seconds": round(seconds, 3),
        "images_per_second": round(images / seconds, 1) if seconds > 0 else 0.0,
        "counters": counters,
    }


def _stages(counters: Dict[str, int]) -> List[str]:
    """The read's failure stages in their order, then those of later steps (``inference``) by name."""
    later = sorted(name[len("failures_"):] for name in counters
                   if name.startswith("failures_") and name[len("failures_"):] not in FailureStage.ALL)
    return [*FailureStage.ALL, *later]


def _examples(values) -> List[dict]:
    """The sampled failures, at most EXAMPLES_PER_STAGE per stage, in a stable order."""
    from pipelines.steps import EXAMPLES_PER_STAGE

    examples = sorted((json.loads(v) for v in values), key=lambda e: (e["stage"], e["tar"], e["member"] or ""))
    kept: List[dict] = []
    per_stage: Dict[str, int] = {}
    for e in examples:
        if per_stage.get(e["stage"], 0) < EXAMPLES_PER_STAGE:
            per_stage[e["stage"]] = per_stage.get(e["stage"], 0) + 1
            kept.append(e)
    return kept


def failure_report(s: Dict[str, object]) -> List[str]:
    """The failures by stage, then the first few reasons of each stage, as lines."""
    by_stage = s["failures_by_stage"]
    if not by_stage:
        return ["  no failure was recorded: the tars hold no members with the JPEG extensions (--extensions)"]
    lines = ["  failures by stage: " + ", ".join(f"{stage} {n}" for stage, n in by_stage.items())]
    for e in s["failure_examples"]:
        where = e["tar"] + (f" member {e['member']}" if e["member"] else "")
        lines.append(f"    {e['stage']:<8} {where}: {e['error']}")
    return lines


def print_summary(prog: str, s: Dict[str, object]) -> None:
    wrote = s["output"] is not None
    what = "images written" if wrote else "images decoded"
    count = s["images_written"] if wrote else s["images_decoded"]
    if s.get("exit_code") == EXIT_NOTHING_WRITTEN:
        print(f"{prog}: finished in {s['seconds']:.1f} s on {s['runner']}, but no image was "
              f"{'written' if wrote else 'decoded'}")
    else:
        print(f"{prog}: done in {s['seconds']:.1f} s on {s['runner']}")
    print(f"  input            {s['input']}")
    print(f"  tars read        {s['tars']} ({s['tars_corrupt']} of them corrupt or cut off)")
    if s["tars_failed"]:
        print(f"  tars not opened  {s['tars_failed']}")
    print(f"  {what:<16} {count} ({s['images_per_second']} images/s)")
    print(f"  failures         {s['failures']} ({s['images_failed']} images lost)")
    if s["failures_by_stage"]:
        print("  by stage         " + ", ".join(f"{stage} {n}" for stage, n in s["failures_by_stage"].items()))
    print(f"  members skipped  {s['members_skipped']}")
    if s["decoder_crashes"]:
        print(f"  decoder crashes  {s['decoder_crashes']} (contained: each cost at most the image that caused it)")
    if wrote:
        files = s["output_files"]
        where = files[0] if len(files) == 1 else f"{s['output']}* ({len(files)} files)"
        print(f"  output           {where if files else 'none: no image to write'}")
    if s["failures_path"]:
        written = s["failures_path"] if s["failures"] else "none written: nothing was lost"
        print(f"  failures file    {written}")


def preview_lines(rows: List[dict], headers: Sequence[str] = ("image_id", "image_path", "shape", "metadata")
                  ) -> List[str]:
    """rows of {id, path, shape, metadata} as aligned text lines, under ``headers``."""
    table = [tuple(headers)]
    for row in rows:
        meta = row["metadata"]
        table.append((row["id"], row["path"], row["shape"], meta if len(meta) <= 70 else meta[:67] + "..."))
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    return ["  " + "  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in table]


def main_for(run: Callable[[Optional[Sequence[str]]], Dict[str, object]], prog: str) -> None:
    """The command line: runs the job in a supervised child process (see ``pipelines.supervise``), which
    calls ``run(None)``. Exit codes: 0 done; 1 the pipeline failed; 2 a usage error (one line on stderr);
    3 tars matched but no image was written (the failures by stage and first reasons on stderr); 130 / 143
    interrupted by SIGINT / SIGTERM (one line; worker processes ended, partial outputs removed)."""
    if supervise.should_supervise():
        sys.exit(supervise.supervise(prog))
    try:
        summary = run(None)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(EXIT_SIGINT)
    if summary.get("exit_code") == EXIT_NOTHING_WRITTEN:
        what = "written" if summary["output"] is not None else "decoded"
        print(f"{prog}: error: {summary['tars_matched']} tars matched but no image was {what}; "
              f"{summary['failures']} failures", file=sys.stderr)
        for line in failure_report(summary):
            print(line, file=sys.stderr)
        sys.exit(EXIT_NOTHING_WRITTEN)
    sys.exit(EXIT_OK)
