"""Decode the JPEGs of tar shards with DALI and write them to Parquet, one row per image.

    python -m pipelines.tar_to_parquet --input build/sample --output build/demo/images \
        --failures build/demo/failures.jsonl --runner FnApiRunner

Prints a summary (tars, images written, failures, images/s, where the output went) and the first rows of the
output. ``--help`` lists the flags; every other flag is passed to Beam. The columns are described in
``beam_tarimg.schema``; by default (``--image_format original``) the image column holds each JPEG's own bytes in
Hugging Face's ``Image`` storage, so ``datasets.load_dataset("parquet", data_files=...)`` gives PIL images.
``--resize`` (with ``--crop``, ``--resize_mode``, ``--interpolation``: ``pipelines.options.resize_option``)
resizes on decode and stores the resized pixels, as PNG unless ``--image_format`` says raw or jpeg.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from pipelines import main_for, preview_lines, run_pipeline
from pipelines.options import PARQUET_FLAGS, resize_option

PROG = "python -m pipelines.tar_to_parquet"
DESCRIPTION = "Decode the JPEGs of webdataset-style tar shards with NVIDIA DALI and write them to Parquet."


def _sink(args):
    from beam_tarimg.parquetio import WriteImagesToParquet

    return WriteImagesToParquet(
        args.output,
        num_shards=args.num_shards,
        row_group_bytes=args.row_group_mb * 1024 * 1024,
        image_format=args.image_format,
        jpeg_quality=args.jpeg_quality,
        codec=args.codec,
    )


def preview(path: str, n: int) -> List[str]:
    """The first ``n`` rows of a Parquet file of images (id, path, shape, metadata), read with pyarrow."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path, compression_type="uncompressed") as f:
        batches = pq.ParquetFile(f).iter_batches(
            batch_size=n, columns=["image_id", "image_path", "height", "width", "channels", "metadata"]
        )
        rows = next(batches, None)
        rows = rows.to_pylist() if rows is not None else []
    return preview_lines(
        [
            {"id": r["image_id"], "path": r["image_path"], "shape": f"{r['height']}x{r['width']}x{r['channels']}",
             "metadata": r["metadata"]}
            for r in rows
        ]
    )


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Runs the pipeline with these command-line flags; returns the summary dict it printed."""
    return run_pipeline(argv, prog=PROG, description=DESCRIPTION, make_sink=_sink, preview=preview,
                        flags=PARQUET_FLAGS, read_options=resize_option)


def main() -> None:
    main_for(run, PROG)


if __name__ == "__main__":
    main()
