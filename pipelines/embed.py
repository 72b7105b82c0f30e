"""Decode the JPEGs of tar shards with DALI, run an ONNX model on them, write one embedding per image to Parquet.

    python -m pipelines.embed --input build/sample --output build/embed/embeddings --model model.onnx \\
        --resize 224 --crop 224 --interpolation cubic --mean 122.770938,116.7460125,104.09373615 \\
        --std 68.5005327,66.6321579,70.32316305 --failures build/embed/failures.jsonl --runner FnApiRunner

Columns: ``image_id`` (string), ``image_path`` (string), ``embedding`` (``list<float32>``: the model's first
output for the image, flattened), which pandas, DuckDB, pyarrow and Hugging Face ``datasets`` read as they are.
Each ImageBatch is one model call (``beam_tarimg.inference``: ``RunInference`` with ``OnnxModelHandlerNumpy``);
images the model refuses (a batch of shapes it does not take) are failures of stage ``inference`` in the
failures file, beside those of the read. The model file is the user's: see the README, "Feeding a model".
Flags, summary, progress, interrupts and exit codes are those of the other jobs (``pipelines``).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

from pipelines import main_for, preview_lines, run_pipeline
from pipelines.options import EMBED_FLAGS, EMBED_HELP, UsageError, resize_option

PROG = "python -m pipelines.embed"
DESCRIPTION = ("Decode the JPEGs of webdataset-style tar shards with NVIDIA DALI, run an ONNX model on them in "
               "batches and write each image's embedding to Parquet.")


def model_input(args) -> Tuple[Dict[str, object], object]:
    """How the images become the model's input: (options for ``ReadAllImagesFromTars``, numpy preprocessing of
    each batch array or None). With ``--resize`` the decode resizes, crops and normalises (``beam_tarimg.Resize``);
    without it the images go at their decoded size and ``Normalize`` converts each batch (dtype, mean/std,
    layout) with numpy."""
    from beam_tarimg.inference import Normalize

    if args.resize is None:
        return {}, Normalize(args.mean, args.std, layout=args.layout, dtype=args.dtype)
    one_or_three = {name: v[0] if v is not None and len(v) == 1 else v  # "--mean 127.5": one for all channels
                    for name, v in (("mean", args.mean), ("std", args.std))}
    return resize_option(args, dtype=args.dtype, layout=args.layout, **one_or_three), None


def _read_options(args) -> Dict[str, object]:
    """Checks ``--model`` (a local file must exist and be an ONNX model whose first input fits ``--layout`` and
    ``--dtype``) and gives the decode's resize options."""
    if "://" not in args.model:
        if not os.path.isfile(args.model):
            raise UsageError(f"--model {args.model!r}: no such file")
        check_model(args.model, args.layout, args.dtype)
    return model_input(args)[0]


def check_model(path: str, layout: str, dtype: str) -> None:
    """UsageError when the ONNX file at ``path`` cannot be read, or its first input is not a batch of images in
    ``layout`` (a channel axis of 3 where the layout puts it, when the model fixes it) and ``dtype``."""
    try:
        import onnx
    except ImportError:
        raise UsageError("--model needs onnx and onnxruntime: pip install 'beam-tarimg[inference]'") from None
    try:
        model = onnx.load(path, load_external_data=False)
        first = model.graph.input[0]
    except Exception as e:  # protobuf's DecodeError, an empty graph
        raise UsageError(f"--model {path!r} is not an ONNX model: {type(e).__name__}: {e}") from None
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    first = inputs[0] if inputs else first
    tensor = first.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    expected_type = {"float32": onnx.TensorProto.FLOAT, "uint8": onnx.TensorProto.UINT8}[dtype]
    if tensor.elem_type != expected_type:
        got = onnx.TensorProto.DataType.Name(tensor.elem_type)
        raise UsageError(f"--model {path!r}: its input {first.name!r} takes {got}, not {dtype} (--dtype)")
    if len(dims) != 4:
        raise UsageError(f"--model {path!r}: its input {first.name!r} has {len(dims)} dimensions; a batch of "
                         "images has 4, (N, 3, H, W) or (N, H, W, 3)")
    channel_axis, other_axis = (1, 3) if layout == "CHW" else (3, 1)
    if dims[channel_axis] not in (None, 3) or (dims[channel_axis] is None and dims[other_axis] == 3):
        raise UsageError(f"--model {path!r}: its input {first.name!r} has shape "
                         f"{['?' if d is None else d for d in dims]}, not 3 channels where --layout {layout} "
                         "puts them; try the other --layout")


def _sink(args):
    from beam_tarimg.inference import onnx_model_handler
    from pipelines.steps import EmbedAndWrite

    return EmbedAndWrite(
        onnx_model_handler(args.model, preprocess=model_input(args)[1]),
        args.output,
        num_shards=args.num_shards,
        row_group_bytes=args.row_group_mb * 1024 * 1024,
        codec=args.codec,
    )


def preview(path: str, n: int) -> List[str]:
    """The first ``n`` rows of an embeddings file (id, path, dimension, first values), read with pyarrow."""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    from pipelines.steps import EMBEDDING, IMAGE_ID, IMAGE_PATH

    with FileSystems.open(path, compression_type="uncompressed") as f:
        rows = next(pq.ParquetFile(f).iter_batches(batch_size=n), None)
        rows = rows.to_pylist() if rows is not None else []
    return preview_lines([
        {"id": r[IMAGE_ID], "path": r[IMAGE_PATH], "shape": f"{len(r[EMBEDDING])} floats",
         "metadata": "[" + ", ".join(f"{v:.4g}" for v in r[EMBEDDING][:4]) + (", ...]" if len(r[EMBEDDING]) > 4
                                                                                 else "]")}
        for r in rows
    ], headers=(IMAGE_ID, IMAGE_PATH, "dimension", EMBEDDING))


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Runs the pipeline with these command-line flags; returns the summary dict it printed."""
    return run_pipeline(argv, prog=PROG, description=DESCRIPTION, make_sink=_sink, preview=preview,
                        flags=EMBED_FLAGS, helps=EMBED_HELP, read_options=_read_options)


def main() -> None:
    main_for(run, PROG)


if __name__ == "__main__":
    main()
