"""Decode the JPEGs of tar shards with DALI and write them to TFRecord files, one tf.train.Example per image.

    python -m pipelines.tar_to_tfrecord --input build/sample --output build/demo/images --runner FnApiRunner

Prints a summary (tars, images written, failures, images/s, where the output went) and the first records of
the output. ``--help`` lists the flags; every other flag is passed to Beam. The features (``image/encoded``,
``image/format``, ...) are described in ``beam_tarimg.tfrecordio``. ``--resize`` (and ``--crop``, ``--resize_mode``,
``--interpolation``) resizes on decode and stores the resized pixels, as PNG unless ``--image_format`` says raw
or jpeg. Needs ``pip install tfrecord`` (or TensorFlow) for the Example classes.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from pipelines import main_for, preview_lines, run_pipeline
from pipelines.options import TFRECORD_FLAGS, TFRECORD_HELP, resize_option

PROG = "python -m pipelines.tar_to_tfrecord"
DESCRIPTION = "Decode the JPEGs of webdataset-style tar shards with NVIDIA DALI and write them to TFRecord files."


def _sink(args):
    from beam_tarimg.tfrecordio import WriteImagesToTFRecord

    return WriteImagesToTFRecord(
        args.output,
        num_shards=args.num_shards,
        image_format=args.image_format,
        jpeg_quality=args.jpeg_quality,
    )


def preview(path: str, n: int) -> List[str]:
    """The first ``n`` records of a TFRecord file of images (id, path, shape, metadata)."""
    import itertools

    from apache_beam.io.filesystems import FileSystems

    from beam_tarimg import schema
    from beam_tarimg.tfrecordio import example_pb2, read_records

    rows = []
    with FileSystems.open(path) as f:
        for record in itertools.islice(read_records(f, path), n):
            feature = example_pb2().Example.FromString(record).features.feature
            h, w, c = (feature[k].int64_list.value[0] for k in (schema.TF_HEIGHT, schema.TF_WIDTH, schema.TF_CHANNELS))
            rows.append(
                {
                    "id": feature[schema.TF_SOURCE_ID].bytes_list.value[0].decode("utf-8", errors="replace"),
                    "path": feature[schema.TF_FILENAME].bytes_list.value[0].decode("utf-8", errors="replace"),
                    "shape": f"{h}x{w}x{c}",
                    "metadata": feature[schema.TF_METADATA].bytes_list.value[0].decode("utf-8", errors="replace"),
                }
            )
    return preview_lines(rows)


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Runs the pipeline with these command-line flags; returns the summary dict it printed."""
    return run_pipeline(argv, prog=PROG, description=DESCRIPTION, make_sink=_sink, preview=preview,
                        flags=TFRECORD_FLAGS, helps=TFRECORD_HELP, read_options=resize_option)


def main() -> None:
    main_for(run, PROG)


if __name__ == "__main__":
    main()
