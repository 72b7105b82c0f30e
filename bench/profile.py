"""Where the reader's time goes: ``python -m bench.profile [--input DIR] [--cprofile]``.

Runs ``ReadImagesFromTars`` on the FnApiRunner in-process (one process: the tar reading, the Beam work and the
DALI threads all in view) with its stages timed by wrappers installed around ``read_tar`` and
``ImageDecoder._run``, and prints, per image, the wall time and the CPU time of each stage:

* ``tar``: ``read_tar`` producing the next EncodedBatch (Python tarfile, member bytes read);
* ``dali run``: ``pipe.run()`` (the calling thread waits; DALI's threads decode);
* ``feed+out``: the rest of ``ImageDecoder._run``: ``feed_input`` and turning DALI's output into numpy arrays
  (``out.at(i)`` copies, or views);
* ``rest``: everything else in the process (Beam per-element work, ImageObject creation, counters, the count).

CPU time per image is steadier than wall time on a shared machine: compare it with the limit's (``limit`` case:
``cpu_work / images``). Allocator: whatever the environment says (run it once with and once without the
MALLOC_* variables of ``bench.cases.TUNED_ENV`` to see what the allocator costs). With ``--cprofile`` the
main thread's top functions by own time are printed too.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import sys
import time


class _Stage:
    def __init__(self):
        self.wall = 0.0
        self.cpu = 0.0  # the calling thread's CPU
        self.proc = 0.0  # the whole process's CPU while inside the stage
        self.calls = 0


STAGES = collections.OrderedDict((k, _Stage()) for k in ("tar", "dali run", "_run"))


class _timed:
    def __init__(self, name):
        self.s = STAGES[name]

    def __enter__(self):
        self.w, self.c, self.p = time.perf_counter(), time.thread_time(), time.process_time()

    def __exit__(self, *exc):
        s = self.s
        s.wall += time.perf_counter() - self.w
        s.cpu += time.thread_time() - self.c
        s.proc += time.process_time() - self.p
        s.calls += 1


def install():
    import beam_tarimg.transforms as transforms
    from beam_tarimg.decode import ImageDecoder

    original_read_tar = transforms.read_tar

    def timed_read_tar(*args, **kwargs):
        it = original_read_tar(*args, **kwargs)
        while True:
            with _timed("tar"):
                try:
                    event = next(it)
                except StopIteration:
                    return
            yield event

    original_run = ImageDecoder._run

    def timed_run(self, batch):
        pipe = self._pipe
        if not getattr(pipe, "_bench_timed", False):  # time pipe.run() inside whatever _run does
            raw = pipe.run

            def run(*args, **kwargs):
                with _timed("dali run"):
                    return raw(*args, **kwargs)

            pipe.run = run
            pipe._bench_timed = True
        with _timed("_run"):
            return original_run(self, batch)

    transforms.read_tar = timed_read_tar
    ImageDecoder._run = timed_run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    ap.add_argument("--input", default=None, help="a folder of tars (default: the cached ImageNet-like set)")
    ap.add_argument("--num-threads", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--cprofile", action="store_true")
    args = ap.parse_args(argv)
    if args.input is None:
        from bench import corpus

        args.input = corpus.ensure_corpus(corpus.default_root(), [corpus.IMAGENET], with_mem=False)["imagenet"]

    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_tarimg import ReadImagesFromTars
    from bench.beamjobs import CountImages, read_counters

    install()
    kwargs = {"batch_size": args.batch_size}
    if args.num_threads:
        kwargs["num_threads"] = args.num_threads
    profiler = None
    if args.cprofile:
        import cProfile

        profiler = cProfile.Profile()
    w0, p0 = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    p = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    _ = p | ReadImagesFromTars(args.input, **kwargs) | CountImages()
    result = p.run()
    result.wait_until_finish()
    if profiler:
        profiler.disable()
    wall, proc = time.perf_counter() - w0, time.process_time() - p0
    images = read_counters(result)["images"]
    ru = resource.getrusage(resource.RUSAGE_SELF)
    alloc = {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    print(f"{images} images in {wall:.2f} s = {images / wall:,.0f} images/s; process CPU {proc:.2f} s "
          f"({proc / wall:.2f} cores); load {os.getloadavg()[0]:.2f}; allocator {alloc}; "
          f"minor page faults {ru.ru_minflt:,} ({ru.ru_minflt / max(1, images):.0f}/image)")
    print(f"{'stage':10} {'wall ms/img':>12} {'caller CPU ms/img':>18} {'process CPU ms/img':>19}")
    tar, run, whole = STAGES["tar"], STAGES["dali run"], STAGES["_run"]
    feed = _Stage()
    feed.wall, feed.cpu, feed.proc = whole.wall - run.wall, whole.cpu - run.cpu, whole.proc - run.proc
    out = {"images": images, "wall_s": wall, "process_cpu_s": proc, "allocator": alloc, "stages": {}}
    for name, s in (("tar", tar), ("dali run", run), ("feed+out", feed)):
        print(f"{name:10} {1000 * s.wall / images:12.3f} {1000 * s.cpu / images:18.3f} {1000 * s.proc / images:19.3f}")
        out["stages"][name] = {"wall_ms_per_image": 1000 * s.wall / images, "caller_cpu_ms_per_image": 1000 * s.cpu / images,
                               "process_cpu_ms_per_image": 1000 * s.proc / images}
    rest_w, rest_p = wall - tar.wall - whole.wall, proc - tar.proc - whole.proc
    print(f"{'rest':10} {1000 * rest_w / images:12.3f} {'':>18} {1000 * rest_p / images:19.3f}")
    print(f"{'total':10} {1000 * wall / images:12.3f} {'':>18} {1000 * proc / images:19.3f}")
    out["stages"]["rest"] = {"wall_ms_per_image": 1000 * rest_w / images, "process_cpu_ms_per_image": 1000 * rest_p / images}
    if profiler:
        import pstats

        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    print("PROFILE_JSON " + json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
