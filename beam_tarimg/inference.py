"""Feeding decoded images to a model with Apache Beam's ``RunInference``, each prediction keyed by its image.

An ``ImageBatch`` is already a model batch: ``ImageBatchModelHandler`` wraps any Beam model handler that takes
numpy arrays (``OnnxModelHandlerNumpy``, ``SklearnModelHandlerNumpy``, ``TFModelHandlerNumpy``, a handler of
your own) and hands it ``batch.pixels``, the batch as one ``(N, ...)`` array (a view of the decode's buffer
when the images lie one after the other in it, as they come from the decoder: no per-image copy), in one call.
RunInference's own batching step is skipped (``should_skip_batching``): its input is the ``PCollection[ImageBatch]``
itself, and each prediction comes out as an ``ImagePrediction`` naming its image::

    from apache_beam.ml.inference.base import RunInference
    from beam_tarimg.inference import ImageBatchModelHandler, onnx_model_handler

    batches = p | ReadImagesFromTars("data/", resize=Resize(256, crop=224, dtype="float32", layout="CHW", ...))
    predictions = batches | RunInference(onnx_model_handler("model.onnx"))
    # or, with the images the model could not take as records: RunInferenceOnImages(...).with_failures()

Images of different shapes in one batch (no resize, or ``mode="shorter"``): the batch is split into groups of
equal shape and dtype, in order, and each group is one model call (stacked: one copy per group); a model with
dynamic height and width takes them all. One the model refuses raises, as any RunInference error; with
``RunInferenceOnImages(...).with_failures()`` each image of that ImageBatch becomes an ``ImageFailure`` of stage
``"inference"`` naming the model's error, and the job goes on.

Beam's ``ml.inference`` is imported with this module, not with ``beam_tarimg``; ONNX Runtime only by
``onnx_model_handler`` (``pip install beam-tarimg[inference]``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, RunInference

from beam_tarimg.transforms import NAMESPACE
from beam_tarimg.types import ImageBatch, ImageFailure, ImageObject, stack_images

INFERENCE = "inference"  # the stage of an ImageFailure whose image the model did not take
LAYOUTS = ("HWC", "CHW")
DTYPES = ("float32", "uint8")


class ImagePrediction(NamedTuple):
    """One image's prediction.

    Attributes:
      image_id: the image's webdataset key (``ImageObject.image_id``).
      image_path: ``"<tar file name>/<member>"`` (``ImageObject.image_path``).
      tar_path: the full path of the tar it came from (``ImageBatch.tar_path``).
      inference: what the wrapped handler gave for this image (its ``PredictionResult.inference``): for
        ``OnnxModelHandlerNumpy``, the model's first output for this image, e.g. a ``float32`` embedding.
      model_id: the wrapped handler's ``PredictionResult.model_id`` (set when Beam updates the model).
    """

    image_id: str
    image_path: str
    tar_path: str
    inference: Any
    model_id: Optional[str] = None


class Normalize:
    """A whole batch array ``(N, H, W, C)`` (uint8 pixels, as decoded) turned into a model's input with numpy:
    ``(x - mean) / std`` in ``dtype``, on the 0-255 scale (as DALI's ``crop_mirror_normalize`` and
    ``Resize(mean=..., std=...)``), then transposed to ``layout`` (``"CHW"``: ``(N, C, H, W)``).

    For inputs that need no resize (images of one size) or when the decode does not normalise; with
    ``Resize(dtype="float32", mean=..., std=..., layout=...)`` the decode does this already. ``mean`` and
    ``std`` are one value or one per channel; ``dtype="uint8"`` only changes the layout.
    """

    def __init__(self, mean: Union[None, float, Sequence[float]] = None,
                 std: Union[None, float, Sequence[float]] = None, layout: str = "HWC", dtype: str = "float32"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if dtype == "uint8" and (mean is not None or std is not None):
            raise ValueError("mean and std need dtype='float32'")
        self.mean = _per_channel("mean", mean)
        self.std = _per_channel("std", std)
        if self.std is not None and not np.all(self.std > 0):
            raise ValueError(f"std must be > 0, got {std!r}")
        self.layout = layout
        self.dtype = dtype

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.ndim != 4:
            raise ValueError(f"Normalize takes a batch (N, H, W, C), got shape {pixels.shape}")
        x = pixels.transpose(0, 3, 1, 2) if self.layout == "CHW" else pixels
        if self.dtype == "uint8":
            return np.ascontiguousarray(x)  # HWC: the batch itself, no copy
        per_channel = (-1, 1, 1) if self.layout == "CHW" else (-1,)
        out = np.empty(x.shape, np.float32)  # one new array, written in two passes: the decode's is never written
        if self.mean is not None:
            np.subtract(x, self.mean.reshape(per_channel), out=out, dtype=np.float32)
        else:
            out[...] = x
        if self.std is not None:
            np.divide(out, self.std.reshape(per_channel), out=out)
        return out

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std}, layout={self.layout!r}, dtype={self.dtype!r})"


def _per_channel(name: str, value) -> Optional[np.ndarray]:
    if value is None:
        return None
    array = np.asarray(value, dtype=np.float32).reshape(-1)
    if array.size not in (1, 3) or not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be one finite number or three (one per channel), got {value!r}")
    return array


def _shape_groups(images: Sequence[ImageObject]) -> List[List[int]]:
    """Indices of the images, grouped by (shape, dtype) in order of first appearance."""
    groups: Dict[Tuple, List[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault((image.image_data.shape, image.image_data.dtype.str), []).append(i)
    return list(groups.values())


class ImageBatchModelHandler(ModelHandler):
    """A RunInference model handler for ``ImageBatch``: the examples are the images, the batch is the ImageBatch.

    Wraps ``inner``, a model handler whose ``run_inference(batch, model, inference_args)`` takes a sequence of
    numpy arrays (one per example) and returns one ``PredictionResult`` per example, in order. It is given the
    ImageBatch's pixels as one ``(N, ...)`` array (``ImageBatch.pixels``: no copy when the images are
    consecutive in the decode's buffer), after ``preprocess`` if given (a function of that array, e.g.
    ``Normalize``, run once per batch). Images of different shapes are split into groups of equal shape, one
    call each (see the module's docstring). Yields an ``ImagePrediction`` per image, in the batch's order.

    RunInference's batching is skipped: each ``ImageBatch`` is one model batch (its size is the reader's
    ``batch_size``). Model loading, sharing across processes, metrics (in the inner handler's namespace),
    model updates and resource hints are the inner handler's. Pre- and post-processing functions belong on
    this handler (``.with_preprocess_fn`` takes an ImageBatch, ``.with_postprocess_fn`` an ImagePrediction):
    an inner handler that has some is refused, since RunInference would not apply them.
    """

    def __init__(self, inner: ModelHandler, *, preprocess: Optional[Callable[[np.ndarray], np.ndarray]] = None):
        super().__init__()
        if not isinstance(inner, ModelHandler):
            raise TypeError(f"inner must be an apache_beam ModelHandler, got {type(inner).__name__}")
        if list(inner.get_preprocess_fns()) or list(inner.get_postprocess_fns()):
            raise ValueError("the inner model handler has pre- or post-processing functions, which would not run "
                             "here: add them to the ImageBatchModelHandler instead")
        if preprocess is not None and not callable(preprocess):
            raise TypeError(f"preprocess must be callable, got {preprocess!r}")
        self._inner = inner
        self._preprocess = preprocess

    @property
    def inner(self) -> ModelHandler:
        return self._inner

    def load_model(self):
        return self._inner.load_model()

    def run_inference(self, batch: Sequence[ImageObject], model,
                      inference_args: Optional[Dict[str, Any]] = None) -> Iterator[ImagePrediction]:
        """``batch``: an ``ImageBatch`` (or any sequence of ``ImageObject``)."""
        images = list(batch)
        tar_path = batch.tar_path if isinstance(batch, ImageBatch) else ""
        if not images:
            return iter(())
        pixels = batch.pixels if isinstance(batch, ImageBatch) else None
        if pixels is None:
            pixels = stack_images([image.image_data for image in images])
        groups = [list(range(len(images)))] if pixels is not None else _shape_groups(images)
        out: List[Optional[ImagePrediction]] = [None] * len(images)
        for indices in groups:
            array = pixels if pixels is not None else np.stack([images[i].image_data for i in indices])
            if self._preprocess is not None:
                array = self._preprocess(array)
            results = list(self._inner.run_inference(array, model, inference_args))
            if len(results) != len(indices):
                raise ValueError(
                    f"the inner model handler {type(self._inner).__name__} gave {len(results)} results for a batch "
                    f"of {len(indices)} images of shape {images[indices[0]].image_data.shape}: it must give one "
                    "per example")
            for i, result in zip(indices, results):
                image = images[i]
                out[i] = ImagePrediction(image.image_id, image.image_path, tar_path, result.inference,
                                         getattr(result, "model_id", None))
        return iter(out)

    def get_num_bytes(self, batch: Sequence[ImageObject]) -> int:
        return sum(image.image_data.nbytes for image in batch)  # not the default: pickling the pixels to count

    def should_skip_batching(self) -> bool:
        return True

    def batch_elements_kwargs(self):
        return {}

    def get_metrics_namespace(self) -> str:
        return self._inner.get_metrics_namespace()

    def get_resource_hints(self) -> dict:
        return self._inner.get_resource_hints()

    def validate_inference_args(self, inference_args):
        return self._inner.validate_inference_args(inference_args)

    def update_model_path(self, model_path=None):
        return self._inner.update_model_path(model_path)

    def set_environment_vars(self):
        return self._inner.set_environment_vars()

    def share_model_across_processes(self) -> bool:
        return self._inner.share_model_across_processes()

    def model_copies(self) -> int:
        return self._inner.model_copies()

    def override_metrics(self, metrics_namespace: str = "") -> bool:
        return self._inner.override_metrics(metrics_namespace)

    def should_garbage_collect_on_timeout(self) -> bool:
        return self._inner.should_garbage_collect_on_timeout()

    def __repr__(self) -> str:
        return f"ImageBatchModelHandler({type(self._inner).__name__}, preprocess={self._preprocess!r})"


def batch_inference_fn(session, batch, inference_args: Optional[Dict[str, Any]] = None):
    """An ``inference_fn`` for Beam's ``OnnxModelHandlerNumpy`` that feeds a batch that is already one array to
    the session as it is (Beam's default ``numpy.stack``s it: a copy of the whole batch); other sequences
    are stacked as Beam does. Returns the model's first output, as Beam's default does."""
    array = batch if isinstance(batch, np.ndarray) else np.stack(batch, axis=0)
    inputs = {session.get_inputs()[0].name: np.ascontiguousarray(array)}
    if inference_args:
        inputs.update(inference_args)
    return session.run(None, inputs)[0]


def onnx_model_handler(model_uri: str, *, preprocess: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                       providers: Optional[Sequence[str]] = None, **kwargs) -> ImageBatchModelHandler:
    """``ImageBatchModelHandler`` around Beam's ``OnnxModelHandlerNumpy(model_uri, ...)`` (any filesystem Beam
    knows), fed with ``batch_inference_fn``. ``providers``: ONNX Runtime's execution providers, default
    ``CUDAExecutionProvider`` then ``CPUExecutionProvider`` where the installed ONNX Runtime has them, else
    CPU. ``kwargs`` go to ``OnnxModelHandlerNumpy`` (``session_options``, ``provider_options``, ``large_model``...).
    Needs ``onnx`` and ``onnxruntime`` (``pip install beam-tarimg[inference]``)."""
    try:
        import onnxruntime
        from apache_beam.ml.inference.onnx_inference import OnnxModelHandlerNumpy
    except ImportError as e:
        raise ImportError(f"onnx_model_handler needs onnx and onnxruntime: pip install 'beam-tarimg[inference]' "
                          f"({e})") from None
    if providers is None:
        available = onnxruntime.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or available
    kwargs.setdefault("inference_fn", batch_inference_fn)
    return ImageBatchModelHandler(OnnxModelHandlerNumpy(model_uri, providers=list(providers), **kwargs),
                                  preprocess=preprocess)


class _FailedBatchToFailuresFn(beam.DoFn):
    """A batch RunInference failed on (its dead-letter record: ``(batch, (type, repr, traceback))``) as one
    ImageFailure of stage "inference" per image. Counters: images_failed_inference, inference_batches_failed."""

    def setup(self):
        self._images = Metrics.counter(NAMESPACE, "images_failed_inference")
        self._batches = Metrics.counter(NAMESPACE, "inference_batches_failed")

    def process(self, record) -> Iterator[ImageFailure]:
        batch, error = record
        self._batches.inc()
        message = " ".join(str(error[1] if isinstance(error, tuple) and len(error) > 1 else error).split())
        images = list(batch)
        shapes = sorted({tuple(image.image_data.shape) for image in images})
        tar_path = getattr(batch, "tar_path", "")
        text = f"model failed on a batch of {len(images)} images of shapes {shapes}: {message}"
        self._images.inc(len(images))
        for image in images:
            member = image.image_path.partition("/")[2] or image.image_path
            yield ImageFailure(tar_path, member, INFERENCE, text)


class RunInferenceOnImages(beam.PTransform):
    """``PCollection[ImageBatch]`` in, ``PCollection[ImagePrediction]`` out, one per image, through
    ``RunInference``.

    ``model_handler``: an ``ImageBatchModelHandler``, or a numpy model handler, which is wrapped in one (see
    there). ``.with_failures()`` gives ``(predictions, failures)``: each image of a batch on which the model
    raised becomes an ``ImageFailure(tar_path, member, "inference", error)``, and the pipeline goes on (Beam's
    ``RunInference(...).with_exception_handling()``); without it such an error fails the pipeline, as in
    ``RunInference``. ``inference_args`` and ``kwargs`` go to ``RunInference``.
    """

    def __init__(self, model_handler: ModelHandler, *, inference_args: Optional[Dict[str, Any]] = None, **kwargs):
        super().__init__()
        if not isinstance(model_handler, ImageBatchModelHandler):
            model_handler = ImageBatchModelHandler(model_handler)
        self._handler = model_handler
        self._inference_args = inference_args
        self._kwargs = kwargs
        self._with_failures = False

    def with_failures(self) -> "RunInferenceOnImages":
        """The same transform, giving ``(predictions, failures)`` when applied."""
        result = RunInferenceOnImages(self._handler, inference_args=self._inference_args, **self._kwargs)
        result._with_failures = True
        return result

    def expand(self, batches):
        run = RunInference(self._handler, inference_args=self._inference_args, **self._kwargs)
        if not self._with_failures:
            return batches | "RunInference" >> run
        predictions, dead_letters = batches | "RunInference" >> run.with_exception_handling()
        failures = dead_letters.failed_inferences | "FailedBatchesToFailures" >> beam.ParDo(
            _FailedBatchToFailuresFn())
        return predictions, failures


def embedding(prediction: ImagePrediction) -> np.ndarray:
    """A prediction's ``inference`` as a flat ``float32`` vector (an embedding); ValueError if it is not numeric."""
    try:
        vector = np.asarray(prediction.inference, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the model's output for {prediction.image_path} is not a numeric array: "
                         f"{type(prediction.inference).__name__} ({e})") from None
    return vector


__all__ = [
    "INFERENCE",
    "ImageBatchModelHandler",
    "ImagePrediction",
    "Normalize",
    "RunInferenceOnImages",
    "batch_inference_fn",
    "embedding",
    "onnx_model_handler",
]
