"""TFRecord: ``WriteImagesToTFRecord`` (a ``PCollection[ImageBatch]`` in, one ``tf.train.Example`` per image
out, through Beam's ``WriteToTFRecord``) and ``ReadImagesFromTFRecord`` (Examples back into ``ImageBatch``es).

The Examples carry the feature keys of TensorFlow's image tooling (``beam_tarimg.schema`` has the table):
``image/encoded`` (the image file: the member's own bytes for ``original``, else a png/jpeg re-encode) or, for
``raw``, ``image/raw`` (HxWxC uint8), ``image/format`` (``jpeg``, ``png``, ... what the encoded bytes are, or
``raw``), ``image/height``, ``image/width``, ``image/channels`` (of the decoded pixels), ``image/filename``
(``image_path``), ``image/source_id`` (``image_id``) and ``image/metadata`` (JSON). TensorFlow reads them with::

    spec = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "image/raw": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "image/format": tf.io.FixedLenFeature([], tf.string),
        "image/height": tf.io.FixedLenFeature([], tf.int64),
        "image/width": tf.io.FixedLenFeature([], tf.int64),
        "image/channels": tf.io.FixedLenFeature([], tf.int64),
        "image/filename": tf.io.FixedLenFeature([], tf.string),
        "image/source_id": tf.io.FixedLenFeature([], tf.string),
        "image/metadata": tf.io.FixedLenFeature([], tf.string),
    }
    ex = tf.io.parse_single_example(record, spec)
    pixels = tf.io.decode_image(ex["image/encoded"], channels=3, expand_animations=False)   # jpeg, png
    pixels = tf.reshape(tf.io.decode_raw(ex["image/raw"], tf.uint8),
                        tf.stack([ex["image/height"], ex["image/width"], ex["image/channels"]]))   # raw

``tf.io.decode_image`` ignores EXIF orientation: for an ``original`` JPEG with orientation 5-8 it gives the
stored frame, ``image/width`` x ``image/height``. Files written with the earlier feature names
(``image_id``, ``image_path``, ``height``, ``width``, ``channels``, ``image_format``, ``image_data``,
``metadata``) are still read.

The ``tf.train.Example`` classes come from TensorFlow when it is installed, else from the small ``tfrecord``
package (``pip install tfrecord``); both are imported on first use only.
"""

from __future__ import annotations

import importlib.util
import struct
import sys
from typing import Iterator

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_tarimg import coders as _coders  # noqa: F401  (registers the ImageBatch coder)
from beam_tarimg import schema
from beam_tarimg.parquetio import check_file_pattern
from beam_tarimg.transforms import NAMESPACE
from beam_tarimg.types import ImageBatch, ImageObject

_EXAMPLE_PB2 = None
COMPRESSION_TYPES = (
    CompressionTypes.AUTO,
    CompressionTypes.UNCOMPRESSED,
    CompressionTypes.GZIP,
    CompressionTypes.DEFLATE,
    CompressionTypes.BZIP2,
    CompressionTypes.ZSTD,
    CompressionTypes.LZMA,
)
_INSTALL_HINT = (
    "writing or reading TFRecords needs the tf.train.Example protobuf classes: pip install tfrecord "
    "(or have tensorflow installed)"
)


def example_pb2():
    """The module holding ``Example``, ``Features``, ``Feature``, ``BytesList`` and ``Int64List``.

    TensorFlow's own when TensorFlow is installed: the ``tfrecord`` package registers the same message names
    (``tensorflow.Example``, ...) in protobuf's global pool, and whichever of the two is imported second in a
    process fails with "duplicate symbol 'tensorflow.BytesList'" (vahidk/tfrecord#103). Otherwise the
    ``tfrecord`` package's copy, which needs only protobuf. Raises ImportError saying what to install.
    """
    global _EXAMPLE_PB2
    if _EXAMPLE_PB2 is None:
        if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is not None:
            try:
                from tensorflow.core.example import example_pb2 as module

                _EXAMPLE_PB2 = module
                return module
            except Exception:  # a broken TensorFlow install: fall back to the tfrecord package
                pass
        try:
            from tfrecord import example_pb2 as module
        except ImportError as e:
            raise ImportError(_INSTALL_HINT) from e
        _EXAMPLE_PB2 = module
    return _EXAMPLE_PB2


def image_to_example(image: ImageObject, image_format: str = schema.DEFAULT_IMAGE_FORMAT,
                     jpeg_quality: int = 95) -> bytes:
    """One image as a serialized ``tf.train.Example`` with the ``image/...`` features."""
    pb = example_pb2()
    data, h, w, c = schema.image_payload(image, image_format, jpeg_quality)
    if image_format == schema.RAW:
        key, fmt = schema.TF_RAW, schema.RAW
    else:
        key, fmt = schema.TF_ENCODED, image_format if image_format != schema.ORIGINAL else schema.encoding_name(data)
    example = pb.Example()
    f = example.features.feature
    f[key].bytes_list.value.append(bytes(data))
    f[schema.TF_FORMAT].bytes_list.value.append(fmt.encode("ascii"))
    f[schema.TF_HEIGHT].int64_list.value.append(h)
    f[schema.TF_WIDTH].int64_list.value.append(w)
    f[schema.TF_CHANNELS].int64_list.value.append(c)
    f[schema.TF_FILENAME].bytes_list.value.append(image.image_path.encode("utf-8", errors="surrogateescape"))
    f[schema.TF_SOURCE_ID].bytes_list.value.append(image.image_id.encode("utf-8", errors="surrogateescape"))
    f[schema.TF_METADATA].bytes_list.value.append(
        schema.metadata_json(image.image_path, image.metadata).encode("utf-8"))
    return example.SerializeToString()


def _single(features, name: str, kind: str, source: str, required: bool = True):
    feature = features.get(name)
    if feature is None:
        if required:
            raise ValueError(f"{source}: the Example has no feature {name!r}")
        return None
    values = getattr(feature, kind).value
    if len(values) != 1:
        raise ValueError(f"{source}: feature {name!r} must hold one {kind} value, it holds {len(values)}")
    return values[0]


# Feature names of files written before the image/... keys: (path, id, height, width, channels, format, metadata).
_OLD_KEYS = (schema.IMAGE_PATH, schema.IMAGE_ID, schema.HEIGHT, schema.WIDTH, schema.CHANNELS, schema.IMAGE_FORMAT,
             schema.METADATA)
_KEYS = (schema.TF_FILENAME, schema.TF_SOURCE_ID, schema.TF_HEIGHT, schema.TF_WIDTH, schema.TF_CHANNELS,
         schema.TF_FORMAT, schema.TF_METADATA)


def example_to_image(serialized: bytes, source: str = "<record>") -> ImageObject:
    """The image of one serialized ``tf.train.Example`` (``image/...`` features, or the earlier names).
    Encoded images carry their stored bytes as ``encoded``."""
    example = example_pb2().Example.FromString(serialized)
    f = example.features.feature
    old = schema.TF_HEIGHT not in f
    path_key, id_key, h_key, w_key, c_key, fmt_key, meta_key = _OLD_KEYS if old else _KEYS
    path = _single(f, path_key, "bytes_list", source).decode("utf-8", errors="surrogateescape")
    image_id = _single(f, id_key, "bytes_list", source).decode("utf-8", errors="surrogateescape")
    h = _single(f, h_key, "int64_list", source)
    w = _single(f, w_key, "int64_list", source)
    c = _single(f, c_key, "int64_list", source)
    fmt = _single(f, fmt_key, "bytes_list", source, required=not old)
    meta = _single(f, meta_key, "bytes_list", source, required=False)
    fmt = fmt.decode("ascii", errors="replace") if fmt else None
    if old:
        data = _single(f, schema.IMAGE_DATA, "bytes_list", source)
        fmt = fmt or schema.sniff_format(data, h, w, c)
    elif fmt == schema.RAW:
        data = _single(f, schema.TF_RAW, "bytes_list", source)
    else:
        data = _single(f, schema.TF_ENCODED, "bytes_list", source)
        fmt = schema.ORIGINAL  # whatever the bytes are (jpeg, png, ...): Pillow decodes them
    pixels = schema.decode_pixels(f"{source}: {path}", data, fmt, h, w, c)
    return ImageObject(path, image_id, pixels, schema.parse_metadata(meta.decode("utf-8") if meta else None),
                       None if fmt == schema.RAW else data)


_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


def _masked_crc32c(data) -> int:
    import google_crc32c

    crc = google_crc32c.value(bytes(data))
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(fileobj, source: str = "<file>") -> Iterator[bytes]:
    """The records of a TFRecord stream, checking both CRCs of each; raises ValueError on corrupt framing."""
    offset = 0
    while True:
        header = fileobj.read(12)
        if not header:
            return
        if len(header) != 12:
            raise ValueError(f"{source}: truncated record header at byte {offset}")
        (length,) = _U64.unpack_from(header, 0)
        (length_crc,) = _U32.unpack_from(header, 8)
        if _masked_crc32c(header[:8]) != length_crc:
            raise ValueError(f"{source}: corrupt record length at byte {offset}")
        data = fileobj.read(length)
        footer = fileobj.read(4)
        if len(data) != length or len(footer) != 4:
            raise ValueError(f"{source}: truncated record at byte {offset}")
        if _masked_crc32c(data) != _U32.unpack(footer)[0]:
            raise ValueError(f"{source}: corrupt record data at byte {offset}")
        offset += 16 + length
        yield data


class _ImagesToExamplesFn(beam.DoFn):
    """Each image of an ImageBatch as a serialized tf.train.Example. Counter: images_written."""

    def __init__(self, image_format: str, jpeg_quality: int):
        self._image_format = image_format
        self._jpeg_quality = jpeg_quality

    def setup(self):
        example_pb2()
        self._images_written = Metrics.counter(NAMESPACE, "images_written")

    def process(self, batch: ImageBatch) -> Iterator[bytes]:
        for image in batch.images:
            yield image_to_example(image, self._image_format, self._jpeg_quality)
        self._images_written.inc(len(batch.images))


class WriteImagesToTFRecord(beam.PTransform):
    """Writes a ``PCollection[ImageBatch]`` to TFRecord files, one ``tf.train.Example`` per image, through Beam's
    ``WriteToTFRecord`` (sharding, temporary files and the atomic rename come from Beam).

    The output is the ``PCollection`` of the written file names. The features (``image/encoded``,
    ``image/format``, ...) are described in this module's docstring and in ``beam_tarimg.schema``. Needs
    ``pip install tfrecord`` (or TensorFlow) for the Example classes, and ``google-crc32c`` for Beam's record
    checksums.

    Args:
      file_path_prefix: where the files go; each is named ``<prefix><shard name><file_name_suffix>``.
      file_name_suffix: default ``".tfrecord"``; with ``compression_type="auto"`` a ``".gz"`` suffix gzips.
      num_shards: the number of files; 0 (the default) lets the runner decide.
      shard_name_template: Beam's shard naming, default ``"-SSSSS-of-NNNNN"``.
      compression_type: one of ``COMPRESSION_TYPES`` (default ``"auto"``: from the file name suffix).
      image_format: ``"original"`` (default: each image's own JPEG bytes, unchanged, under ``image/encoded``
        with ``image/format`` ``jpeg``), ``"raw"`` (pixels under ``image/raw``), ``"png"`` (lossless) or
        ``"jpeg"`` (lossy re-encode).
      jpeg_quality: JPEG quality for ``image_format="jpeg"`` (1-100, default 95).
    """

    def __init__(
        self,
        file_path_prefix: str,
        *,
        file_name_suffix: str = ".tfrecord",
        num_shards: int = 0,
        shard_name_template=None,
        compression_type: str = "auto",
        image_format: str = schema.DEFAULT_IMAGE_FORMAT,
        jpeg_quality: int = 95,
    ):
        super().__init__()
        schema.check_sink_args(file_path_prefix, file_name_suffix, num_shards, image_format, jpeg_quality)
        if compression_type not in COMPRESSION_TYPES:
            raise ValueError(f"compression_type must be one of {COMPRESSION_TYPES}, got {compression_type!r}")
        example_pb2()  # fail while the pipeline is built, not on the workers
        self._prefix = file_path_prefix
        self._suffix = file_name_suffix
        self._num_shards = num_shards
        self._shard_name_template = shard_name_template
        self._compression_type = compression_type
        self._image_format = image_format
        self._jpeg_quality = jpeg_quality

    def expand(self, batches):
        examples = batches | "ImagesToExamples" >> beam.ParDo(
            _ImagesToExamplesFn(self._image_format, self._jpeg_quality)
        ).with_input_types(ImageBatch).with_output_types(bytes)
        return examples | "WriteToTFRecord" >> beam.io.WriteToTFRecord(
            self._prefix,
            file_name_suffix=self._suffix,
            num_shards=self._num_shards,
            shard_name_template=self._shard_name_template,
            compression_type=self._compression_type,
        )


class _ReadTFRecordFileFn(beam.DoFn):
    """Reads one TFRecord file of image Examples into ImageBatches. Counter: images_read."""

    def __init__(self, batch_size: int, compression_type: str):
        self._batch_size = batch_size
        self._compression_type = compression_type

    def setup(self):
        example_pb2()
        self._images_read = Metrics.counter(NAMESPACE, "images_read")

    def process(self, element) -> Iterator[ImageBatch]:
        path = element if isinstance(element, str) else element.path
        grouper = schema.BatchGrouper(path, self._batch_size)
        with FileSystems.open(path, compression_type=self._compression_type) as f:
            for i, record in enumerate(read_records(f, path)):
                yield from grouper.add(example_to_image(record, f"{path} record {i}"))
                self._images_read.inc()
        yield from grouper.flush()


class ReadImagesFromTFRecord(beam.PTransform):
    """Reads TFRecord files of image Examples back into a ``PCollection[ImageBatch]``.

    Each file is read by one worker, front to back, checking the CRCs of every record. Batches are formed as
    in ``ReadImagesFromParquet``: up to ``batch_size`` consecutive records of one file from the same tar,
    ``tar_path`` being that tar's file name taken from ``image_path`` (or the TFRecord file's path when
    ``image_path`` has no ``/``). Encoded images are decoded back with Pillow (EXIF orientation applied) and keep
    their bytes as ``ImageObject.encoded``; files with the earlier feature names are read too.

    Args:
      file_pattern: a glob on any Beam filesystem, e.g. ``"out/images-*.tfrecord"``.
      batch_size: images per ImageBatch at most.
      compression_type: one of ``COMPRESSION_TYPES`` (default ``"auto"``: from the file name suffix).
      validate: check at construction that ``file_pattern`` matches at least one file.
    """

    def __init__(
        self, file_pattern: str, *, batch_size: int = 100, compression_type: str = "auto", validate: bool = True
    ):
        super().__init__()
        check_file_pattern(file_pattern, validate)
        schema.check_int("batch_size", batch_size, 1)
        if compression_type not in COMPRESSION_TYPES:
            raise ValueError(f"compression_type must be one of {COMPRESSION_TYPES}, got {compression_type!r}")
        example_pb2()
        self._pattern = file_pattern
        self._batch_size = batch_size
        self._compression_type = compression_type

    def expand(self, pbegin):
        return (
            pbegin
            | "MatchFiles" >> fileio.MatchFiles(self._pattern, fileio.EmptyMatchTreatment.DISALLOW)
            | "SpreadFiles" >> beam.Reshuffle()
            | "ReadFiles"
            >> beam.ParDo(_ReadTFRecordFileFn(self._batch_size, self._compression_type)).with_output_types(
                ImageBatch
            )
        )
