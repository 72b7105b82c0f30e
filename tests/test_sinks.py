"""Parquet and TFRecord sinks and readers: real DALI (CPU), the FnApiRunner, real files in tmp_path.

One pipeline decodes a few small tars once and writes every output format; the tests read those files back
with the project's readers, with pyarrow, and (TFRecord) with a protobuf parser and a record-framing reader
written here, independent of the writer.
"""

from __future__ import annotations

import io
import json
import os
import struct

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that
from PIL import Image, ImageOps

from beam_tarimg.parquetio import ReadImagesFromParquet, WriteImagesToParquet
from beam_tarimg.sample import encode_jpeg, photo_like_image, write_tar
from beam_tarimg.tfrecordio import ReadImagesFromTFRecord, WriteImagesToTFRecord
from beam_tarimg.transforms import NAMESPACE, ReadImagesFromTars

pytest.importorskip("tfrecord", reason="the TFRecord sink needs the tf.train.Example classes: pip install tfrecord")

RUNNER = ["--runner=FnApiRunner"]
BATCH = 4
SMALL_ROW_GROUP = 20_000


def _sample_members(rng, key, width, height, *, meta=None, caption=None, **jpeg):
    members = [(f"{key}.jpg", encode_jpeg(photo_like_image(rng, width, height), **jpeg))]
    if meta is not None:
        members.append((f"{key}.json", json.dumps(meta).encode("utf-8")))
    if caption is not None:
        members.append((f"{key}.txt", caption.encode("utf-8")))
    return members


def _make_tars(directory):
    rng = np.random.default_rng(7)
    tar0 = []
    tar0 += _sample_members(rng, "a000", 64, 48, meta={"label": 0, "nested": {"xs": [1, 2]}}, caption="first")
    tar0 += _sample_members(rng, "a001", 80, 60, meta={"label": 1}, quality=75, subsampling="4:4:4")
    tar0 += _sample_members(rng, "a002", 33, 47, meta={"label": 2}, caption="odd size")
    tar0 += _sample_members(rng, "a003", 50, 40, meta={"label": 3}, grayscale=True)
    tar0 += _sample_members(rng, "a004", 60, 40, meta={"label": 4}, exif_orientation=6)
    tar0 += _sample_members(rng, "a005", 72, 52, meta={"label": 5}, progressive=True)
    tar1 = []
    tar1 += _sample_members(rng, "b000", 40, 30, caption="caf\u00e9 \u2615")
    tar1 += _sample_members(rng, "b001", 41, 31)
    tar1 += _sample_members(rng, "b002", 42, 32, meta={"label": None, "score": 0.5})
    paths = []
    for name, members in (("00000.tar", tar0), ("00001.tar", tar1)):
        path = os.path.join(directory, name)
        write_tar(path, members)
        paths.append(path)
    return paths


def _expected_images(tar_paths):
    """image_path -> (image_id, pixels, metadata), decoded with Pillow, independently of the project."""
    import tarfile

    expected = {}
    for tar_path in tar_paths:
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            key, ext = name.rsplit(".", 1)
            if ext != "jpg":
                continue
            with Image.open(io.BytesIO(data)) as img:
                pixels = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
            meta = json.loads(members[f"{key}.json"]) if f"{key}.json" in members else {}
            if f"{key}.txt" in members:
                meta["caption"] = members[f"{key}.txt"].decode("utf-8")
            expected[f"{os.path.basename(tar_path)}/{name}"] = (key, pixels, meta)
    return expected


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Decodes the tars once and writes them in every format; returns paths, expectations and metrics."""
    root = tmp_path_factory.mktemp("sinks")
    tars = _make_tars(str(root))
    out = root / "out"
    prefixes = {
        "parquet_raw": str(out / "raw"),
        "parquet_png": str(out / "png"),
        "parquet_jpeg": str(out / "jpeg"),
        "parquet_small_groups": str(out / "small"),
        "tfrecord_raw": str(out / "raw"),
        "tfrecord_png": str(out / "png"),
        "tfrecord_jpeg": str(out / "jpeg"),
        "tfrecord_gzip": str(out / "gz"),
    }
    p = beam.Pipeline(options=PipelineOptions(RUNNER))
    batches = p | ReadImagesFromTars(str(root), batch_size=BATCH, include_metadata=True)
    _ = batches | "ParquetRaw" >> WriteImagesToParquet(prefixes["parquet_raw"])
    _ = batches | "ParquetPng" >> WriteImagesToParquet(prefixes["parquet_png"], image_format="png")
    _ = batches | "ParquetJpeg" >> WriteImagesToParquet(prefixes["parquet_jpeg"], image_format="jpeg")
    _ = batches | "ParquetSmallGroups" >> WriteImagesToParquet(
        prefixes["parquet_small_groups"], row_group_bytes=SMALL_ROW_GROUP, codec="zstd"
    )
    _ = batches | "TFRecordRaw" >> WriteImagesToTFRecord(prefixes["tfrecord_raw"])
    _ = batches | "TFRecordPng" >> WriteImagesToTFRecord(prefixes["tfrecord_png"], image_format="png")
    _ = batches | "TFRecordJpeg" >> WriteImagesToTFRecord(prefixes["tfrecord_jpeg"], image_format="jpeg")
    _ = batches | "TFRecordGzip" >> WriteImagesToTFRecord(prefixes["tfrecord_gzip"], file_name_suffix=".tfrecord.gz")
    result = p.run()
    result.wait_until_finish()
    counters = {
        (r.key.step, r.key.metric.name): r.committed
        for r in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    }
    suffix = {"parquet": ".parquet", "tfrecord": ".tfrecord"}
    globs = {
        name: prefix + "-*" + (".tfrecord.gz" if name == "tfrecord_gzip" else suffix[name.split("_")[0]])
        for name, prefix in prefixes.items()
    }
    return {"globs": globs, "expected": _expected_images(tars), "counters": counters, "out": out}


def _read_and_check(transform, check, *args):
    """Runs a reader; ``check(batches, *args)`` runs on all its ImageBatches as a Beam matcher."""
    with beam.Pipeline(options=PipelineOptions(RUNNER)) as p:
        assert_that(p | transform, lambda batches: check(list(batches), *args))


def _check_exact(batches, expected, batch_size):
    _check_batches_group_one_tar(batches, batch_size)
    images = {image.image_path: image for batch in batches for image in batch}
    assert sorted(images) == sorted(expected)
    for path, (image_id, pixels, meta) in expected.items():
        image = images[path]
        assert image.image_id == image_id
        assert image.metadata == meta
        assert image.image_data.dtype == np.uint8
        np.testing.assert_array_equal(image.image_data, pixels, err_msg=path)


def _check_batches_group_one_tar(batches, batch_size):
    assert batches
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        assert {image.image_path.split("/", 1)[0] for image in batch} == {batch.tar_path}


@pytest.mark.parametrize("name", ["parquet_raw", "parquet_png", "parquet_small_groups"])
def test_parquet_round_trip__project_reader_gives_back_the_decoded_pixels_ids_paths_and_metadata(written, name):
    _read_and_check(ReadImagesFromParquet(written["globs"][name], batch_size=3), _check_exact, written["expected"], 3)


@pytest.mark.parametrize("name", ["tfrecord_raw", "tfrecord_png", "tfrecord_gzip"])
def test_tfrecord_round_trip__project_reader_gives_back_the_decoded_pixels_ids_paths_and_metadata(written, name):
    _read_and_check(ReadImagesFromTFRecord(written["globs"][name], batch_size=3), _check_exact, written["expected"], 3)


@pytest.mark.parametrize("reader,name", [(ReadImagesFromParquet, "parquet_jpeg"), (ReadImagesFromTFRecord, "tfrecord_jpeg")])
def test_jpeg_reencode_round_trip__reader_decodes_close_pixels_of_the_recorded_shape(written, reader, name):
    _read_and_check(reader(written["globs"][name], batch_size=100), _check_close, written["expected"])


def _check_close(batches, expected):
    images = {image.image_path: image for batch in batches for image in batch}
    assert sorted(images) == sorted(expected)
    for path, (image_id, pixels, meta) in expected.items():
        got = images[path]
        assert (got.image_id, got.metadata, got.image_data.shape) == (image_id, meta, pixels.shape)
        diff = np.abs(got.image_data.astype(np.int16) - pixels.astype(np.int16))
        assert diff.mean() < 4.0, (path, diff.mean())


def test_parquet_is_readable_by_pyarrow_with_the_documented_column_types(written):
    table = pq.read_table(_glob(written["globs"]["parquet_raw"]))
    types = {field.name: str(field.type) for field in table.schema}
    assert types == {
        "image_id": "string", "image_path": "string", "height": "int32", "width": "int32", "channels": "int32",
        "image_format": "string", "image_data": "binary", "metadata": "string",
    }
    rows = {row["image_path"]: row for row in table.to_pylist()}
    assert sorted(rows) == sorted(written["expected"])
    for path, (image_id, pixels, meta) in written["expected"].items():
        row = rows[path]
        assert row["image_id"] == image_id and row["image_format"] == "raw"
        assert (row["height"], row["width"], row["channels"]) == pixels.shape
        assert json.loads(row["metadata"]) == meta
        shaped = np.frombuffer(row["image_data"], np.uint8).reshape(row["height"], row["width"], row["channels"])
        np.testing.assert_array_equal(shaped, pixels)


def test_parquet_png_and_jpeg_rows_hold_encoded_images_that_pillow_opens(written):
    for name, magic in (("parquet_png", b"\x89PNG"), ("parquet_jpeg", b"\xff\xd8\xff")):
        table = pq.read_table(_glob(written["globs"][name]))
        for row in table.to_pylist():
            assert row["image_format"] == name.split("_")[1]
            assert row["image_data"].startswith(magic)
            with Image.open(io.BytesIO(row["image_data"])) as img:
                assert (img.height, img.width) == (row["height"], row["width"])


def test_parquet_row_groups_are_closed_by_bytes_not_by_a_row_count(written):
    files = _glob(written["globs"]["parquet_small_groups"])
    largest_image = max(p.nbytes for _, p, _ in written["expected"].values())
    groups = 0
    for path in files:
        pf = pq.ParquetFile(path)
        last = pf.metadata.num_row_groups - 1
        for i in range(last + 1):
            data = pf.read_row_group(i, columns=["image_data"]).column(0)
            total = sum(len(v) for v in data.to_pylist())
            assert total < SMALL_ROW_GROUP + largest_image  # closed by the image that crossed the limit
            if i < last:  # only the end of a bundle closes a smaller one (the metadata counts a little too)
                assert total > SMALL_ROW_GROUP - 200 * len(data)
            groups += 1
    assert groups >= 3
    assert pq.ParquetFile(files[0]).metadata.row_group(0).column(0).compression == "ZSTD"


def test_sinks_count_images_written_in_the_beam_tarimg_namespace(written):
    n = len(written["expected"])
    per_step = {step: v for (step, name), v in written["counters"].items() if name == "images_written"}
    assert len(per_step) == 8
    assert set(per_step.values()) == {n}


def test_sinks_leave_no_temporary_files_behind(written):
    leftovers = [name for name in os.listdir(written["out"]) if name.startswith("beam-temp")]
    assert leftovers == []


# --- TFRecord parsed without the project's code: record framing and a protobuf schema built here ---------


def _masked_crc(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _independent_records(path):
    with open(path, "rb") as f:
        blob = f.read()
    pos, records = 0, []
    while pos < len(blob):
        (length,) = struct.unpack_from("<Q", blob, pos)
        (length_crc,) = struct.unpack_from("<I", blob, pos + 8)
        assert length_crc == _masked_crc(blob[pos : pos + 8])
        data = blob[pos + 12 : pos + 12 + length]
        (data_crc,) = struct.unpack_from("<I", blob, pos + 12 + length)
        assert data_crc == _masked_crc(data)
        records.append(data)
        pos += 16 + length
    assert pos == len(blob)
    return records


def _independent_example_class():
    """tensorflow/core/example/{feature,example}.proto, rebuilt in a private descriptor pool."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="independent/example.proto", package="independent",
                                             syntax="proto3")

    def message(name, parent=None):
        return (parent.nested_type if parent else fdp.message_type).add(name=name)

    def field(msg, name, number, ftype, label=F.LABEL_OPTIONAL, type_name=None, oneof_index=None):
        f = msg.field.add(name=name, number=number, type=ftype, label=label)
        if type_name:
            f.type_name = type_name
        if oneof_index is not None:
            f.oneof_index = oneof_index
        return f

    field(message("BytesList"), "value", 1, F.TYPE_BYTES, F.LABEL_REPEATED)
    field(message("FloatList"), "value", 1, F.TYPE_FLOAT, F.LABEL_REPEATED).options.packed = True
    field(message("Int64List"), "value", 1, F.TYPE_INT64, F.LABEL_REPEATED).options.packed = True
    feature = message("Feature")
    feature.oneof_decl.add(name="kind")
    field(feature, "bytes_list", 1, F.TYPE_MESSAGE, type_name=".independent.BytesList", oneof_index=0)
    field(feature, "float_list", 2, F.TYPE_MESSAGE, type_name=".independent.FloatList", oneof_index=0)
    field(feature, "int64_list", 3, F.TYPE_MESSAGE, type_name=".independent.Int64List", oneof_index=0)
    features = message("Features")
    entry = message("FeatureEntry", features)
    entry.options.map_entry = True
    field(entry, "key", 1, F.TYPE_STRING)
    field(entry, "value", 2, F.TYPE_MESSAGE, type_name=".independent.Feature")
    field(features, "feature", 1, F.TYPE_MESSAGE, F.LABEL_REPEATED, type_name=".independent.Features.FeatureEntry")
    field(message("Example"), "features", 1, F.TYPE_MESSAGE, type_name=".independent.Features")

    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("independent.Example"))


def test_tfrecord_files_parse_as_tf_train_examples_with_an_independent_reader_and_schema(written):
    example_class = _independent_example_class()
    kinds = {"image_id": "bytes_list", "image_path": "bytes_list", "height": "int64_list",
             "width": "int64_list", "channels": "int64_list", "image_format": "bytes_list",
             "image_data": "bytes_list", "metadata": "bytes_list"}
    seen = {}
    for path in _glob(written["globs"]["tfrecord_raw"]):
        for record in _independent_records(path):
            feature = example_class.FromString(record).features.feature
            assert set(feature) == set(kinds)
            for name, kind in kinds.items():
                assert feature[name].WhichOneof("kind") == kind
                assert len(getattr(feature[name], kind).value) == 1
            value = {name: getattr(feature[name], kind).value[0] for name, kind in kinds.items()}
            seen[value["image_path"].decode("utf-8")] = value
    assert sorted(seen) == sorted(written["expected"])
    for path, (image_id, pixels, meta) in written["expected"].items():
        value = seen[path]
        assert value["image_id"] == image_id.encode("utf-8")
        assert value["image_format"] == b"raw"
        assert (value["height"], value["width"], value["channels"]) == pixels.shape
        assert json.loads(value["metadata"].decode("utf-8")) == meta
        np.testing.assert_array_equal(np.frombuffer(value["image_data"], np.uint8).reshape(pixels.shape), pixels)


def test_tfrecord_files_are_readable_by_tensorflow(written):
    tf = pytest.importorskip("tensorflow")
    spec = {name: tf.io.FixedLenFeature([], tf.int64 if name in ("height", "width", "channels") else tf.string)
            for name in ("image_id", "image_path", "height", "width", "channels", "image_format", "image_data",
                         "metadata")}
    seen = {}
    for record in tf.data.TFRecordDataset(_glob(written["globs"]["tfrecord_raw"])):
        ex = tf.io.parse_single_example(record, spec)
        shape = tf.stack([ex["height"], ex["width"], ex["channels"]])
        seen[ex["image_path"].numpy().decode()] = tf.reshape(tf.io.decode_raw(ex["image_data"], tf.uint8), shape)
    for path, (_, pixels, _) in written["expected"].items():
        np.testing.assert_array_equal(seen[path].numpy(), pixels)


def test_parquet_is_readable_by_pandas_and_duckdb(written):
    pd = pytest.importorskip("pandas")
    duckdb = pytest.importorskip("duckdb")
    files = _glob(written["globs"]["parquet_raw"])
    frame = pd.concat([pd.read_parquet(f) for f in files])
    assert sorted(frame["image_path"]) == sorted(written["expected"])
    rows = duckdb.sql(f"SELECT image_id, height * width * channels AS n, octet_length(image_data) AS b "
                      f"FROM read_parquet({files!r})").fetchall()
    assert len(rows) == len(written["expected"]) and all(n == b for _, n, b in rows)


# --- argument checks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,bad",
    [
        (lambda: WriteImagesToParquet("out/x", image_format="webp"), "'webp'"),
        (lambda: WriteImagesToParquet("out/x", jpeg_quality=0), "0"),
        (lambda: WriteImagesToParquet("out/x", row_group_bytes=0), "0"),
        (lambda: WriteImagesToParquet("out/x", row_group_bytes=2**31), str(2**31)),
        (lambda: WriteImagesToParquet("out/x", codec="lzma"), "'lzma'"),
        (lambda: WriteImagesToParquet("out/x", num_shards=-1), "-1"),
        (lambda: WriteImagesToParquet(""), "''"),
        (lambda: WriteImagesToTFRecord("out/x", image_format="RAW"), "'RAW'"),
        (lambda: WriteImagesToTFRecord("out/x", compression_type="zip"), "'zip'"),
        (lambda: WriteImagesToTFRecord("out/x", jpeg_quality=101), "101"),
        (lambda: ReadImagesFromParquet("out/*.parquet", batch_size=0, validate=False), "0"),
        (lambda: ReadImagesFromTFRecord("out/*.tfrecord", batch_size=True, validate=False), "True"),
    ],
)
def test_sink_and_reader_arguments_are_checked_with_value_errors_that_name_the_bad_value(make, bad):
    with pytest.raises(ValueError, match=bad.replace("*", r"\*")):
        make()


def test_readers_reject_a_pattern_that_matches_nothing_when_built(tmp_path):
    pattern = str(tmp_path / "nothing-*.parquet")
    with pytest.raises(ValueError, match="no files match"):
        ReadImagesFromParquet(pattern)
    with pytest.raises(ValueError, match="no files match"):
        ReadImagesFromTFRecord(str(tmp_path / "nothing-*.tfrecord"))


def test_sink_fails_with_a_clear_error_for_pixels_that_are_not_uint8(tmp_path):
    from beam_tarimg.types import ImageBatch, ImageObject

    batch = ImageBatch("t.tar", [ImageObject("t.tar/x.jpg", "x", np.zeros((2, 2, 3), np.float32))])
    with pytest.raises(Exception, match="must be uint8"):
        with beam.Pipeline(options=PipelineOptions(RUNNER)) as p:
            _ = p | beam.Create([batch]) | WriteImagesToParquet(str(tmp_path / "x"))


def _glob(pattern):
    import glob

    files = sorted(glob.glob(pattern))
    assert files, pattern
    return files


# --- Member names that are not UTF-8: written as their escape, read back equal ------------------------------

_HOSTILE_NAMES = [b"caf\xe9.jpg", b"back\\slash.jpg", b"\xff\xfe/x\\xe9.jpg", "caf\u00e9 \u2615.jpg".encode()]


def _check_same_images(batches, expected):
    got = {image.image_path: image for batch in batches for image in batch}
    assert sorted(got) == sorted(expected)
    for path, image in expected.items():
        assert got[path] == image, path


def test_sinks_and_readers_round_trip_escaped_member_names_that_are_not_utf8(tmp_path):
    from beam_tarimg.tario import escape_member_name, member_name_bytes
    from beam_tarimg.types import ImageBatch, ImageObject

    rng = np.random.default_rng(11)
    tar_name = escape_member_name("caf\udce9.tar")
    images = []
    for i, raw in enumerate(_HOSTILE_NAMES):
        member = escape_member_name(raw.decode("utf-8", "surrogateescape"))
        pixels = rng.integers(0, 256, (4 + i, 5, 3), dtype=np.uint8)
        images.append(ImageObject(f"{tar_name}/{member}", member.rsplit(".", 1)[0], pixels, {"i": i}))
    with beam.Pipeline(options=PipelineOptions(RUNNER)) as p:
        batches = p | beam.Create([ImageBatch(tar_name, images)])
        _ = batches | "Parquet" >> WriteImagesToParquet(str(tmp_path / "names"))
        _ = batches | "TFRecord" >> WriteImagesToTFRecord(str(tmp_path / "names"))
    expected = {image.image_path: image for image in images}
    assert [member_name_bytes(path.split("/", 1)[1]) for path in expected] == _HOSTILE_NAMES
    _read_and_check(ReadImagesFromParquet(str(tmp_path / "names-*.parquet")), _check_same_images, expected)
    _read_and_check(ReadImagesFromTFRecord(str(tmp_path / "names-*.tfrecord")), _check_same_images, expected)


def test_tar_with_a_latin1_member_name_is_decoded_written_and_read_back_under_its_escaped_name(tmp_path):
    import tarfile

    from beam_tarimg.types import ImageObject

    rng = np.random.default_rng(12)
    data = encode_jpeg(photo_like_image(rng, 40, 30))
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(src / "00000.tar", "w", format=tarfile.GNU_FORMAT, encoding="utf-8") as tar:
        for raw in (b"caf\xe9.jpg", b"a\\b.jpg"):
            info = tarfile.TarInfo(raw.decode("utf-8", "surrogateescape"))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with Image.open(io.BytesIO(data)) as img:
        pixels = np.asarray(img.convert("RGB"))
    expected = {
        "00000.tar/caf\\xe9.jpg": ImageObject("00000.tar/caf\\xe9.jpg", "caf\\xe9", pixels, {}),
        "00000.tar/a\\\\b.jpg": ImageObject("00000.tar/a\\\\b.jpg", "a\\\\b", pixels, {}),
    }
    with beam.Pipeline(options=PipelineOptions(RUNNER)) as p:
        batches = p | ReadImagesFromTars(str(src), batch_size=BATCH)
        _ = batches | "Parquet" >> WriteImagesToParquet(str(tmp_path / "out"))
        _ = batches | "TFRecord" >> WriteImagesToTFRecord(str(tmp_path / "out"))
    _read_and_check(ReadImagesFromParquet(str(tmp_path / "out-*.parquet")), _check_same_images, expected)
    _read_and_check(ReadImagesFromTFRecord(str(tmp_path / "out-*.tfrecord")), _check_same_images, expected)
