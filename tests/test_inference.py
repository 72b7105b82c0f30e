"""RunInference on ImageBatches with a real ONNX Runtime session, on a small model the tests build themselves.

The reference is the same model run directly with onnxruntime on the pixels of the same decode (collected
from the same pipeline): the predictions must equal it, every image id must come out exactly once, as a
prediction or a failure.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import _PickleTo, _load_all, make_jpeg, run_pipeline, write_tar

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

CLIP_MEAN = (122.770938, 116.7460125, 104.09373615)
CLIP_STD = (68.5005327, 66.6321579, 70.32316305)
EMBEDDING_DIM = 16


def build_embedding_model(path, *, layout: str = "CHW", height=None, width=None, seed: int = 0) -> str:
    """A small float32 image model: conv 3x3 (8 channels) + ReLU + global average pool + a linear layer to a
    16-d embedding. Input ``pixels`` (N, 3, H, W) or (N, H, W, 3); H and W dynamic unless given."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    conv_w = rng.normal(0, 0.2, (8, 3, 3, 3)).astype(np.float32)
    conv_b = rng.normal(0, 0.1, (8,)).astype(np.float32)
    fc_w = rng.normal(0, 0.5, (8, EMBEDDING_DIM)).astype(np.float32)
    fc_b = rng.normal(0, 0.1, (EMBEDDING_DIM,)).astype(np.float32)
    h, w = height or "H", width or "W"
    dims = ["N", 3, h, w] if layout == "CHW" else ["N", h, w, 3]
    nodes = []
    source = "pixels"
    if layout == "HWC":
        nodes.append(helper.make_node("Transpose", ["pixels"], ["nchw"], perm=[0, 3, 1, 2]))
        source = "nchw"
    nodes += [
        helper.make_node("Conv", [source, "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "fc_w"], ["fc"]),
        helper.make_node("Add", ["fc", "fc_b"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_embedder",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", EMBEDDING_DIM])],
        initializer=[numpy_helper.from_array(a, n) for a, n in
                     ((conv_w, "conv_w"), (conv_b, "conv_b"), (fc_w, "fc_w"), (fc_b, "fc_b"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def run_directly(model_path: str, array: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    return session.run(None, {"pixels": np.ascontiguousarray(array)})[0]


def _predict(tmp_path, source, handler, plain=False, **read_kwargs):
    """Reads ``source`` and runs ``RunInferenceOnImages(handler).with_failures()`` (``plain``: Beam's own
    ``RunInference(handler)``) on the FnApiRunner; returns (predictions, failures of reading and of the model,
    {image_id: decoded pixels} of the same decode, counters)."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference

    from beam_tarimg import ReadImagesFromTars
    from beam_tarimg.inference import RunInferenceOnImages

    pixels_dir = tmp_path / "pixels"
    pixels_dir.mkdir()

    def build(p):
        batches, read_failures = p | ReadImagesFromTars(str(source), **read_kwargs).with_failures()
        _ = batches | "KeepPixels" >> beam.FlatMap(
            lambda b: [(i.image_id, i.image_data.copy()) for i in b]) | beam.Map(_PickleTo(str(pixels_dir)))
        if plain:
            return batches | RunInference(handler), read_failures
        predictions, model_failures = batches | RunInferenceOnImages(handler).with_failures()
        return predictions, (read_failures, model_failures) | beam.Flatten()

    result = run_pipeline(build, tmp_path, runner="FnApiRunner")
    return result.batches, result.failures, dict(_load_all(str(pixels_dir))), result.counters


def test_run_inference_on_image_batches__equals_onnxruntime_on_the_same_arrays_every_id_once(tmp_path):
    from beam_tarimg.inference import Normalize, onnx_model_handler

    model = build_embedding_model(tmp_path / "model.onnx")
    data = tmp_path / "in"
    data.mkdir()
    expected_ids = set()
    for t in range(2):
        members = [(f"t{t}-{i:03d}.jpg", make_jpeg(10 * t + i, width=48, height=40)) for i in range(7)]
        expected_ids |= {name[:-4] for name, _ in members}
        if t == 1:
            members.insert(3, ("broken.jpg", b"\xff\xd8\xff\xe0 not the rest of a JPEG" * 3))
        write_tar(data / f"{t:05d}.tar", members)

    normalize = Normalize(CLIP_MEAN, CLIP_STD, layout="CHW")
    handler = onnx_model_handler(model, preprocess=normalize, providers=["CPUExecutionProvider"])
    predictions, failures, pixels, counters = _predict(tmp_path, data, handler, batch_size=4)

    ids = [p.image_id for p in predictions]
    assert sorted(ids) == sorted(expected_ids)  # every image exactly once
    assert [(f.member, f.stage) for f in failures] == [("broken.jpg", "decode")]  # the corrupt one, not lost
    assert {p.tar_path for p in predictions} == {str(data / "00000.tar"), str(data / "00001.tar")}
    assert all(p.image_path == f"{os.path.basename(p.tar_path)}/{p.image_id}.jpg" for p in predictions)
    order = sorted(expected_ids)
    direct = run_directly(model, normalize(np.stack([pixels[i] for i in order])))
    got = np.stack([np.asarray(p.inference) for p in sorted(predictions, key=lambda p: p.image_id)])
    assert got.shape == (14, EMBEDDING_DIM) and got.dtype == np.float32
    np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-6)
    # The reference: the model on CLIP-normalised CHW float32 arrays, computed here by hand.
    by_hand = (pixels[order[0]].astype(np.float32) - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
    np.testing.assert_allclose(run_directly(model, by_hand.transpose(2, 0, 1)[None])[0], direct[0],
                               rtol=1e-5, atol=1e-6)
    assert counters.get("images_failed_inference", 0) == 0


def test_mixed_shapes__a_dynamic_model_takes_each_shape_group_a_fixed_one_fails_only_those_batches(tmp_path):
    # The first half through Beam's own RunInference(handler), the second through RunInferenceOnImages.
    from beam_tarimg.inference import INFERENCE, Normalize, onnx_model_handler

    data = tmp_path / "in"
    data.mkdir()
    # 00000.tar: two sizes mixed in one batch; 00001.tar: all 48x40.
    mixed = [(f"m{i}.jpg", make_jpeg(i, *((48, 40) if i % 2 else (32, 24)))) for i in range(5)]
    plain = [(f"p{i}.jpg", make_jpeg(50 + i, 48, 40)) for i in range(3)]
    write_tar(data / "00000.tar", mixed)
    write_tar(data / "00001.tar", plain)
    normalize = Normalize(layout="HWC")  # float32, no mean/std

    dynamic = build_embedding_model(tmp_path / "dynamic.onnx", layout="HWC")
    (tmp_path / "a").mkdir()
    predictions, failures, pixels, _ = _predict(
        tmp_path / "a", data, onnx_model_handler(dynamic, preprocess=normalize), plain=True, batch_size=8)
    assert failures == []
    assert sorted(p.image_id for p in predictions) == sorted([n[:-4] for n, _ in mixed + plain])
    for p in predictions:  # each image as if run alone
        np.testing.assert_allclose(p.inference, run_directly(dynamic, normalize(pixels[p.image_id][None]))[0],
                                   rtol=1e-5, atol=1e-6)

    fixed = build_embedding_model(tmp_path / "fixed.onnx", layout="HWC", height=40, width=48)
    (tmp_path / "b").mkdir()
    predictions, failures, _, counters = _predict(
        tmp_path / "b", data, onnx_model_handler(fixed, preprocess=normalize), batch_size=8)
    assert sorted(p.image_id for p in predictions) == ["p0", "p1", "p2"]
    assert sorted(f.member for f in failures) == sorted(n for n, _ in mixed)  # the whole mixed batch, once each
    assert {f.stage for f in failures} == {INFERENCE}
    assert all(f.tar_path == str(data / "00000.tar") for f in failures)
    assert all("model failed on a batch of 5 images of shapes [(24, 32, 3), (40, 48, 3)]" in f.error
               and "pixels" in f.error for f in failures)  # ONNX Runtime's message names the input
    assert counters["images_failed_inference"] == 5 and counters["inference_batches_failed"] == 1


class _Recording:
    """A model handler's inner half that records what it was given and answers with each example's mean."""

    def __init__(self):
        from apache_beam.ml.inference.base import ModelHandler, PredictionResult

        class Inner(ModelHandler):
            seen = []

            def load_model(self):
                return "model"

            def run_inference(self, batch, model, inference_args=None):
                Inner.seen.append(batch)
                return [PredictionResult(x, float(np.mean(x))) for x in batch]

        self.handler = Inner()
        self.seen = Inner.seen


def test_handler__feeds_the_decodes_buffer_without_a_copy_and_keeps_order_by_shape_group():
    from beam_tarimg.inference import ImageBatchModelHandler
    from beam_tarimg.types import ImageBatch, ImageObject

    buffer = np.arange(3 * 4 * 5 * 3, dtype=np.uint8).reshape(3, 4, 5, 3)  # one run's pixels, one buffer
    batch = ImageBatch("/d/a.tar", [ImageObject(f"a.tar/{i}.jpg", str(i), buffer[i]) for i in range(3)])
    recording = _Recording()
    handler = ImageBatchModelHandler(recording.handler)
    out = list(handler.run_inference(batch, handler.load_model()))
    assert len(recording.seen) == 1 and np.shares_memory(recording.seen[0], buffer)  # the buffer itself
    assert [p.image_id for p in out] == ["0", "1", "2"]
    assert [p.inference for p in out] == [float(np.mean(buffer[i])) for i in range(3)]
    assert handler.should_skip_batching() and handler.get_num_bytes(batch) == buffer.nbytes

    small = np.full((2, 2, 3), 7, np.uint8)
    mixed = ImageBatch("/d/b.tar", [ImageObject("b.tar/0.jpg", "0", buffer[0]),
                                    ImageObject("b.tar/1.jpg", "1", small),
                                    ImageObject("b.tar/2.jpg", "2", buffer[2])])
    recording.seen.clear()
    out = list(handler.run_inference(mixed, "model"))
    assert [p.image_id for p in out] == ["0", "1", "2"]  # the batch's order, not the groups'
    assert [p.inference for p in out] == [float(np.mean(buffer[0])), 7.0, float(np.mean(buffer[2]))]
    assert [a.shape for a in recording.seen] == [(2, 4, 5, 3), (1, 2, 2, 3)]


def test_normalize_matches_the_formula_and_refuses_bad_arguments():
    from beam_tarimg.inference import Normalize

    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)
    out = Normalize(CLIP_MEAN, CLIP_STD, layout="CHW")(pixels)
    expected = ((pixels.astype(np.float32) - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)).transpose(0, 3, 1, 2)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(Normalize(mean=CLIP_MEAN, layout="HWC")(pixels),
                                  pixels.astype(np.float32) - np.float32(CLIP_MEAN))
    np.testing.assert_array_equal(Normalize(std=2)(pixels), pixels.astype(np.float32) / np.float32(2))
    np.testing.assert_array_equal(Normalize()(pixels), pixels.astype(np.float32))
    np.testing.assert_array_equal(Normalize(dtype="uint8", layout="CHW")(pixels), pixels.transpose(0, 3, 1, 2))
    assert Normalize(dtype="uint8", layout="HWC")(pixels) is pixels  # nothing to do: no copy
    for kwargs in ({"mean": (1, 2)}, {"std": 0}, {"layout": "NCHW"}, {"dtype": "float16"},
                   {"dtype": "uint8", "mean": 1}):
        with pytest.raises(ValueError):
            Normalize(**kwargs)
