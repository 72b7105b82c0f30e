"""Parquet: ``WriteImagesToParquet`` (a ``PCollection[ImageBatch]`` in, one row per image out, through Beam's
``WriteToParquetBatched``) and ``ReadImagesFromParquet`` (rows back into ``ImageBatch``es).

The schema is ``beam_tarimg.schema``'s: ``RAW_SCHEMA`` for ``image_format="raw"``, ``ENCODED_SCHEMA`` (an
``image`` column in Hugging Face's ``Image`` storage, and the ``huggingface`` schema metadata that describes
every column) for the encoded formats. Row groups are sized by bytes (``row_group_bytes``), so a writer holds
at most about one row group of images, never a whole shard.
"""

from __future__ import annotations

import json
import logging
from typing import Dict, Iterator, List

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam import coders
from apache_beam.io import filebasedsink, fileio
try:  # the one Beam internal used here (see _WriteRowGroups); without it Beam's own writer serves, slower
    from apache_beam.io.parquetio import _ParquetSink
except ImportError:  # pragma: no cover - a Beam that renamed it
    _ParquetSink = None
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from beam_tarimg import coders as _coders  # noqa: F401  (registers the ImageBatch coder)
from beam_tarimg import schema
from beam_tarimg.transforms import NAMESPACE, match_files
from beam_tarimg.types import ImageBatch, ImageObject

DEFAULT_ROW_GROUP_BYTES = 64 * 1024 * 1024
# A Parquet binary column chunk has 32-bit offsets; one row group must stay below 2 GiB of image data.
MAX_ROW_GROUP_BYTES = 1024 * 1024 * 1024

_HEAD = [
    pa.field(schema.IMAGE_ID, pa.string(), nullable=False),
    pa.field(schema.IMAGE_PATH, pa.string(), nullable=False),
    pa.field(schema.HEIGHT, pa.int32(), nullable=False),
    pa.field(schema.WIDTH, pa.int32(), nullable=False),
    pa.field(schema.CHANNELS, pa.int32(), nullable=False),
    pa.field(schema.IMAGE_FORMAT, pa.string(), nullable=False),
]
_TAIL = [pa.field(schema.METADATA, pa.string(), nullable=False)]

# image_format="raw": the pixels as one binary value per row (unchanged since the first release).
RAW_SCHEMA = pa.schema([*_HEAD, pa.field(schema.IMAGE_DATA, pa.binary(), nullable=False), *_TAIL])
ARROW_SCHEMA = RAW_SCHEMA  # the name of RAW_SCHEMA before the encoded formats had a schema of their own

# Hugging Face datasets' Image storage: exactly this struct (field order, nullable, binary not large_binary).
HF_IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])


def _hf_features(fields) -> Dict[str, dict]:
    kinds = {pa.string(): "string", pa.int32(): "int32", pa.binary(): "binary"}
    return {f.name: {"_type": "Image"} if f.type == HF_IMAGE_TYPE else {"dtype": kinds[f.type], "_type": "Value"}
            for f in fields}


_ENCODED_FIELDS = [*_HEAD, pa.field(schema.IMAGE, HF_IMAGE_TYPE, nullable=True), *_TAIL]
# The encoded formats (original, png, jpeg): the image file's bytes in an ``image`` column that Hugging Face
# datasets (and the Hub's viewer) decode as images, described by the ``huggingface`` schema metadata.
ENCODED_SCHEMA = pa.schema(
    _ENCODED_FIELDS,
    metadata={"huggingface": json.dumps({"info": {"features": _hf_features(_ENCODED_FIELDS)}})},
)

PARQUET_CODECS = schema.PARQUET_CODECS


def arrow_schema(image_format: str) -> pa.Schema:
    """The Arrow schema of the files written with ``image_format``."""
    return RAW_SCHEMA if image_format == schema.RAW else ENCODED_SCHEMA


class _RowGroup:
    """Type hint of the PCollection between the table builder and the sink: its elements are ``pyarrow.Table``s,
    each one Parquet row group. It only selects ``_ArrowTableCoder``, so that Beam's size sampling measures
    a table by its byte count instead of pickling it."""


class _ArrowTableCoder(coders.Coder):
    """A pyarrow Table as an Arrow IPC stream; ``estimate_size`` reads ``Table.nbytes``."""

    def encode(self, table: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()

    def decode(self, encoded: bytes) -> pa.Table:
        return pa.ipc.open_stream(pa.py_buffer(encoded)).read_all()

    def is_deterministic(self) -> bool:
        return False

    def estimate_size(self, table: pa.Table) -> int:
        return int(table.nbytes)

    def to_type_hint(self):
        return _RowGroup

    def __eq__(self, other):
        return type(self) is type(other)

    def __hash__(self):
        return hash(type(self))


coders.registry.register_coder(_RowGroup, _ArrowTableCoder)


# Dictionary-encode the small columns only: for image bytes Parquet would hash every value of a write batch
# looking for repeats before giving up (~0.1 ms per JPEG here, a sixth of its decode), and find none. The same
# columns carry statistics: min/max of image bytes prune no query and cost ~10 us per JPEG to compute.
_DICTIONARY_COLUMNS = [f.name for f in _HEAD + _TAIL]


class _ImageParquetSink(_ParquetSink or object):
    """Beam's Parquet sink (temporary files, sharding, the atomic rename), its writer opened without
    dictionary encoding or statistics for the image bytes."""

    def open(self, temp_path):
        self._file_handle = filebasedsink.FileBasedSink.open(self, temp_path)
        return pq.ParquetWriter(self._file_handle, self._schema, compression=self._codec,
                                use_dictionary=_DICTIONARY_COLUMNS, write_statistics=_DICTIONARY_COLUMNS)


class _WriteRowGroups(beam.io.WriteToParquetBatched):
    """``WriteToParquetBatched`` writing through ``_ImageParquetSink`` where this Beam's sink is the one it
    was written against; otherwise through Beam's own (dictionary-encoded image bytes: correct, slower)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        sink = getattr(self, "_sink", None)
        if _ParquetSink is not None and type(sink) is _ParquetSink and all(
            hasattr(sink, a) for a in ("_schema", "_codec")
        ):
            sink.__class__ = _ImageParquetSink
        else:
            logging.getLogger(__name__).warning(
                "beam_tarimg: this Beam's Parquet sink is not the one expected; writing with its default "
                "(dictionary-encoded) settings"
            )


class _PendingRows:
    """Columns of the rows of one row group being collected; the image bytes are joined only at the end."""

    __slots__ = ("ids", "paths", "heights", "widths", "channels", "data", "metadata", "nbytes")

    def __init__(self):
        self.ids: List[str] = []
        self.paths: List[str] = []
        self.heights: List[int] = []
        self.widths: List[int] = []
        self.channels: List[int] = []
        self.data: list = []
        self.metadata: List[str] = []
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.ids)

    def to_table(self, image_format: str) -> pa.Table:
        """The rows as a table of ``arrow_schema(image_format)``: the image bytes are joined into one buffer."""
        n = len(self.ids)
        lengths = np.fromiter((len(d) for d in self.data), dtype=np.int64, count=n)
        ends = np.cumsum(lengths)
        if n and ends[-1] >= 2**31:
            raise ValueError(f"a row group of {ends[-1]} bytes of image data is over the 2 GiB a Parquet "
                             f"binary column chunk can hold: lower row_group_bytes")
        offsets = np.zeros(n + 1, dtype=np.int32)
        offsets[1:] = ends
        image_data = pa.Array.from_buffers(
            pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(self.data))]
        )
        paths = pa.array(self.paths, pa.string())
        if image_format != schema.RAW:  # {"bytes": the file, "path": image_path}, as datasets.Image stores it
            image_data = pa.StructArray.from_arrays([image_data, paths], fields=list(HF_IMAGE_TYPE))
        columns = [
            pa.array(self.ids, pa.string()),
            paths,
            pa.array(np.asarray(self.heights, dtype=np.int32)),
            pa.array(np.asarray(self.widths, dtype=np.int32)),
            pa.array(np.asarray(self.channels, dtype=np.int32)),
            pa.array([image_format] * n, pa.string()),
            image_data,
            pa.array(self.metadata, pa.string()),
        ]
        return pa.Table.from_arrays(columns, schema=arrow_schema(image_format))


class _ImagesToRowGroupsFn(beam.DoFn):
    """Collects the images of ImageBatches into ``pyarrow.Table``s of about ``row_group_bytes`` each (one per
    window; the rest at the end of the bundle). Counters: images_written, row_groups_written."""

    def __init__(self, row_group_bytes: int, image_format: str, jpeg_quality: int):
        self._row_group_bytes = row_group_bytes
        self._image_format = image_format
        self._jpeg_quality = jpeg_quality

    def setup(self):
        self._images_written = Metrics.counter(NAMESPACE, "images_written")
        self._row_groups_written = Metrics.counter(NAMESPACE, "row_groups_written")

    def start_bundle(self):
        self._pending: Dict[object, _PendingRows] = {}

    def process(self, batch: ImageBatch, window=beam.DoFn.WindowParam) -> Iterator[pa.Table]:
        rows = self._pending.get(window)
        if rows is None:
            rows = self._pending[window] = _PendingRows()
        for image in batch.images:
            data, h, w, c = schema.image_payload(image, self._image_format, self._jpeg_quality)
            meta = schema.metadata_json(image.image_path, image.metadata)
            rows.ids.append(image.image_id)
            rows.paths.append(image.image_path)
            rows.heights.append(h)
            rows.widths.append(w)
            rows.channels.append(c)
            rows.data.append(data)
            rows.metadata.append(meta)
            rows.nbytes += len(data) + len(meta) + len(image.image_path) + len(image.image_id) + 16
            if rows.nbytes >= self._row_group_bytes:
                yield self._flush(window)
                rows = self._pending[window] = _PendingRows()

    def finish_bundle(self):
        pending, self._pending = self._pending, {}
        for window, rows in pending.items():
            if len(rows):
                yield WindowedValue(self._to_table(rows), window.max_timestamp(), [window])

    def _flush(self, window) -> pa.Table:
        return self._to_table(self._pending.pop(window))

    def _to_table(self, rows: _PendingRows) -> pa.Table:
        table = rows.to_table(self._image_format)
        self._images_written.inc(table.num_rows)
        self._row_groups_written.inc()
        return table


class WriteImagesToParquet(beam.PTransform):
    """Writes a ``PCollection[ImageBatch]`` to Parquet files, one row per image, through Beam's
    ``WriteToParquetBatched`` (so sharding, temporary files and the atomic rename come from Beam).

    The output is the ``PCollection`` of the written file names. See ``beam_tarimg.schema`` for the columns:
    for the encoded formats the image is an ``image`` column of type ``struct<bytes: binary, path: string>``
    with the ``huggingface`` schema metadata, so ``datasets.load_dataset("parquet", data_files=...)`` gives PIL
    images; for ``raw`` it is ``image_data``, binary HxWxC uint8.

    Args:
      file_path_prefix: where the files go, e.g. ``"gs://bucket/out/images"``; each file is named
        ``<prefix><shard name><file_name_suffix>``.
      file_name_suffix: default ``".parquet"``.
      num_shards: the number of files; 0 (the default) lets the runner decide (about one per bundle). A fixed
        number makes Beam group all rows by shard before writing.
      shard_name_template: Beam's shard naming, default ``"-SSSSS-of-NNNNN"``.
      row_group_bytes: a row group is closed once its images reach this many bytes (default 64 MiB); each
        writer holds at most about one row group in memory. At most 1 GiB.
      codec: Parquet compression, one of ``PARQUET_CODECS`` (default ``"none"``: JPEG bytes and raw pixels
        barely compress).
      image_format: ``"original"`` (default: each image's own JPEG bytes, unchanged: about the size of the
        input tars; needs ``ImageObject.encoded``, which ``ReadImagesFromTars`` fills), ``"raw"`` (HxWxC
        uint8, ~13x the input), ``"png"`` (lossless re-encode, ~5x, slow) or ``"jpeg"`` (lossy re-encode);
        the readers decode the encoded formats back to pixels.
      jpeg_quality: JPEG quality for ``image_format="jpeg"`` (1-100, default 95).
    """

    def __init__(
        self,
        file_path_prefix: str,
        *,
        file_name_suffix: str = ".parquet",
        num_shards: int = 0,
        shard_name_template=None,
        row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
        codec: str = "none",
        image_format: str = schema.DEFAULT_IMAGE_FORMAT,
        jpeg_quality: int = 95,
    ):
        super().__init__()
        schema.check_sink_args(file_path_prefix, file_name_suffix, num_shards, image_format, jpeg_quality)
        schema.check_int("row_group_bytes", row_group_bytes, 1)
        if row_group_bytes > MAX_ROW_GROUP_BYTES:
            raise ValueError(f"row_group_bytes must be at most {MAX_ROW_GROUP_BYTES}, got {row_group_bytes!r}")
        if not isinstance(codec, str) or codec.lower() not in PARQUET_CODECS:
            raise ValueError(f"codec must be one of {PARQUET_CODECS}, got {codec!r}")
        self._prefix = file_path_prefix
        self._suffix = file_name_suffix
        self._num_shards = num_shards
        self._shard_name_template = shard_name_template
        self._row_group_bytes = row_group_bytes
        self._codec = codec.lower()
        self._image_format = image_format
        self._jpeg_quality = jpeg_quality

    def expand(self, batches):
        tables = batches | "ImagesToRowGroups" >> beam.ParDo(
            _ImagesToRowGroupsFn(self._row_group_bytes, self._image_format, self._jpeg_quality)
        ).with_input_types(ImageBatch).with_output_types(_RowGroup)
        return tables | "WriteToParquet" >> _WriteRowGroups(
            self._prefix,
            schema=arrow_schema(self._image_format),
            codec=self._codec,
            file_name_suffix=self._suffix,
            num_shards=self._num_shards,
            shard_name_template=self._shard_name_template,
        )


def _binary_rows(array: pa.Array, name: str = schema.IMAGE_DATA):
    """Per-row zero-copy byte views of a binary column (list of memoryviews)."""
    if array.null_count:
        raise ValueError(f"{name} has null values")
    if pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type):
        offset_type = np.int32 if pa.types.is_binary(array.type) else np.int64
        _, offsets_buf, data_buf = array.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=offset_type)[array.offset : array.offset + len(array) + 1]
        data = memoryview(data_buf) if data_buf is not None else memoryview(b"")
        return [data[offsets[i] : offsets[i + 1]] for i in range(len(array))]
    return [memoryview(v) for v in array.to_pylist()]


def _column(rb: pa.RecordBatch, name: str, default=None) -> list:
    index = rb.schema.get_field_index(name)
    if index < 0:
        return [default] * rb.num_rows
    return rb.column(index).to_pylist()


def images_from_record_batch(rb: pa.RecordBatch, source: str) -> Iterator[ImageObject]:
    """The images of one Arrow record batch of the image schema (``image_format``/``metadata`` optional):
    an ``image`` struct column (encoded formats) or an ``image_data`` column (raw, and files written before
    ``original`` existed, whose ``image_data`` may hold png or jpeg bytes). Images of encoded rows carry their
    stored bytes as ``encoded``."""
    ids = _column(rb, schema.IMAGE_ID)
    paths = _column(rb, schema.IMAGE_PATH)
    heights = _column(rb, schema.HEIGHT)
    widths = _column(rb, schema.WIDTH)
    channels = _column(rb, schema.CHANNELS)
    formats = _column(rb, schema.IMAGE_FORMAT)
    metadata = _column(rb, schema.METADATA)
    struct_index = rb.schema.get_field_index(schema.IMAGE)
    try:
        if struct_index >= 0:
            column = rb.column(struct_index)
            if column.null_count:
                raise ValueError(f"{schema.IMAGE} has null values")
            data = _binary_rows(column.field("bytes"), f"{schema.IMAGE}.bytes")
        else:
            data = _binary_rows(rb.column(rb.schema.get_field_index(schema.IMAGE_DATA)))
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e
    for i in range(rb.num_rows):
        path = paths[i]
        h, w, c = heights[i], widths[i], channels[i]
        fmt = formats[i] or (schema.ORIGINAL if struct_index >= 0 else schema.sniff_format(data[i], h, w, c))
        pixels = schema.decode_pixels(f"{source}: {path}", data[i], fmt, h, w, c)
        encoded = None if fmt == schema.RAW else bytes(data[i])
        yield ImageObject(path, ids[i], pixels, schema.parse_metadata(metadata[i]), encoded)


class _ReadParquetFileFn(beam.DoFn):
    """Reads one Parquet file of the image schema into ImageBatches, one record batch at a time.
    Counter: images_read."""

    def __init__(self, batch_size: int):
        self._batch_size = batch_size

    def setup(self):
        self._images_read = Metrics.counter(NAMESPACE, "images_read")

    def process(self, element) -> Iterator[ImageBatch]:
        path = element if isinstance(element, str) else element.path
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            missing = [name for name in schema.REQUIRED_FIELDS if name not in names]
            if schema.IMAGE_DATA not in names and schema.IMAGE not in names:
                missing.append(f"{schema.IMAGE} or {schema.IMAGE_DATA}")
            if missing:
                raise ValueError(f"{path} is not an image table: it has no column {', '.join(missing)}")
            columns = [name for name in schema.FIELDS if name in names]
            grouper = schema.BatchGrouper(path, self._batch_size)
            for rb in pf.iter_batches(batch_size=self._batch_size, columns=columns):
                for image in images_from_record_batch(rb, path):
                    yield from grouper.add(image)
                self._images_read.inc(rb.num_rows)
            yield from grouper.flush()


class ReadImagesFromParquet(beam.PTransform):
    """Reads Parquet files of the image schema back into a ``PCollection[ImageBatch]``.

    Each file is read by one worker, front to back. A batch holds up to ``batch_size`` consecutive rows of
    one file that come from the same tar; its ``tar_path`` is that tar's file name as recorded in
    ``image_path`` (``"00000.tar"``; the tar's full path is not stored), or the Parquet file's path for rows
    whose ``image_path`` has no ``/``. ``image_data`` is raw pixels (read-only arrays) or, for jpeg/png rows,
    decoded back with Pillow; either way the arrays are HxWxC uint8.

    Args:
      file_pattern: a glob on any Beam filesystem, e.g. ``"out/images-*.parquet"``.
      batch_size: images per ImageBatch at most.
      validate: check at construction that ``file_pattern`` matches at least one file.
    """

    def __init__(self, file_pattern: str, *, batch_size: int = 100, validate: bool = True):
        super().__init__()
        check_file_pattern(file_pattern, validate)
        schema.check_int("batch_size", batch_size, 1)
        self._pattern = file_pattern
        self._batch_size = batch_size

    def expand(self, pbegin):
        return (
            pbegin
            | "MatchFiles" >> fileio.MatchFiles(self._pattern, fileio.EmptyMatchTreatment.DISALLOW)
            | "SpreadFiles" >> beam.Reshuffle()
            | "ReadFiles" >> beam.ParDo(_ReadParquetFileFn(self._batch_size)).with_output_types(ImageBatch)
        )


def check_file_pattern(file_pattern, validate: bool) -> None:
    """Raises ValueError unless ``file_pattern`` is a non-empty string that (with ``validate``) matches files."""
    if not isinstance(file_pattern, str) or not file_pattern:
        raise ValueError(f"file_pattern must be a non-empty string, got {file_pattern!r}")
    if validate:
        match_files(file_pattern)
