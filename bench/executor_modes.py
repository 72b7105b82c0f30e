"""DALI executor and output handling, in one process: what the decode core's choices are worth.

    .venv/bin/python -m bench.executor_modes [--tars 4]

Decodes the ImageNet-like corpus (built by ``python -m bench`` under bench/results/corpus) from memory with
three pipelines of the decode core's shape (external_source -> decoders.image, CPU, batch 100, 2 threads,
prefetch_queue_depth=1, one batch fed per run): the synchronous executor with ``out.at(i)`` copies, the
pipelined (dynamic) executor with copies, and the pipelined executor handing out views (what
``beam_tarimg.decode.ImageDecoder`` does). Prints images/s per round (one warm-up round, then 3) and medians.
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import numpy as np

CORPUS = os.path.join(os.path.dirname(__file__), "results", "corpus", "imagenet-8x500-var-s0-sc1-v1")


def _build(pipelined: bool):
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    pipe = Pipeline(batch_size=100, num_threads=2, device_id=None, prefetch_queue_depth=1,
                    exec_async=pipelined, exec_pipelined=pipelined)
    with pipe:
        encoded = fn.external_source(name="e", dtype=types.UINT8, ndim=1)
        pipe.set_outputs(fn.decoders.image(encoded, device="cpu", output_type=types.RGB))
    pipe.build()
    return pipe


def main() -> None:
    from beam_tarimg.tario import read_tar

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tars", type=int, default=4)
    parser.add_argument("--corpus", default=CORPUS)
    args = parser.parse_args()
    paths = sorted(glob.glob(os.path.join(args.corpus, "*.tar")))[: args.tars]
    if not paths:
        raise SystemExit(f"no corpus at {args.corpus}: run `python -m bench --quick` once first")
    arrays = []
    for path in paths:
        with open(path, "rb") as f:
            for batch in read_tar(f, path, batch_size=100):
                arrays += [np.frombuffer(i.data, np.uint8) for i in batch.images]
    modes = [("synchronous, out.at copies", False, True), ("pipelined, out.at copies", True, True),
             ("pipelined, views (the decode core)", True, False)]
    pipes = {name: _build(pipelined) for name, pipelined, _ in modes}
    rates = {name: [] for name, _, _ in modes}
    for round_ in range(4):
        for name, _, copy in modes:
            pipe = pipes[name]
            start = time.perf_counter()
            for s in range(0, len(arrays), 100):
                pipe.feed_input("e", arrays[s : s + 100])
                (out,) = pipe.run()
                _ = [out.at(i) for i in range(len(out))] if copy else [np.asarray(out[i]) for i in range(len(out))]
            if round_:  # the first round is the warm-up
                rates[name].append(len(arrays) / (time.perf_counter() - start))
    print(f"{len(arrays)} images, load {os.getloadavg()[0]:.2f}")
    for name, values in rates.items():
        print(f"{name:38s} {np.median(values):7,.0f} images/s  (rounds: {', '.join(f'{v:,.0f}' for v in values)})")


if __name__ == "__main__":
    main()
