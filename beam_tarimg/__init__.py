"""beam-tarimg: Apache Beam transforms that decode the JPEGs of webdataset-style tar shards with NVIDIA DALI.

The Beam-free parts (``beam_tarimg.types``, ``beam_tarimg.decode``, ``beam_tarimg.tario``) import without
Apache Beam; the transforms are imported on first use, so ``import beam_tarimg`` stays light.
"""

from beam_tarimg.types import EncodedBatch, EncodedImage, FailureStage, ImageBatch, ImageFailure, ImageObject

__version__ = "0.1.0"

_LAZY = {
    "ReadImagesFromTars": "beam_tarimg.transforms",
    "ReadAllImagesFromTars": "beam_tarimg.transforms",
    "NAMESPACE": "beam_tarimg.transforms",
    "FAILURES": "beam_tarimg.transforms",
    "ImageBatchCoder": "beam_tarimg.coders",
    "EncodedBatchCoder": "beam_tarimg.coders",
    "ImageDecoder": "beam_tarimg.decode",
    "Resize": "beam_tarimg.resize",
    "WriteImagesToParquet": "beam_tarimg.parquetio",
    "ReadImagesFromParquet": "beam_tarimg.parquetio",
    "WriteImagesToTFRecord": "beam_tarimg.tfrecordio",
    "ReadImagesFromTFRecord": "beam_tarimg.tfrecordio",
    "ImageBatchModelHandler": "beam_tarimg.inference",
    "ImagePrediction": "beam_tarimg.inference",
    "RunInferenceOnImages": "beam_tarimg.inference",
}

__all__ = [
    "EncodedBatch",
    "EncodedImage",
    "FailureStage",
    "ImageBatch",
    "ImageFailure",
    "ImageObject",
    *_LAZY,
]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'beam_tarimg' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
