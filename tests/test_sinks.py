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
from conftest import make_jpeg
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


def _member_bytes(tar_paths):
    """image_path -> the JPEG member's own bytes, read with tarfile."""
    import tarfile

    out = {}
    for tar_path in tar_paths:
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".jpg"):
                    out[f"{os.path.basename(tar_path)}/{m.name}"] = tar.extractfile(m).read()
    return out


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
        "parquet_original": str(out / "original"),
        "parquet_raw": str(out / "raw"),
        "parquet_png": str(out / "png"),
        "parquet_jpeg": str(out / "jpeg"),
        "parquet_small_groups": str(out / "small"),
        "tfrecord_original": str(out / "original"),
        "tfrecord_raw": str(out / "raw"),
        "tfrecord_png": str(out / "png"),
        "tfrecord_jpeg": str(out / "jpeg"),
        "tfrecord_gzip": str(out / "gz"),
    }
    p = beam.Pipeline(options=PipelineOptions(RUNNER))
    batches = p | ReadImagesFromTars(str(root), batch_size=BATCH, include_metadata=True)
    _ = batches | "ParquetDefault" >> WriteImagesToParquet(prefixes["parquet_original"])
    _ = batches | "ParquetRaw" >> WriteImagesToParquet(prefixes["parquet_raw"], image_format="raw")
    _ = batches | "ParquetPng" >> WriteImagesToParquet(prefixes["parquet_png"], image_format="png")
    _ = batches | "ParquetJpeg" >> WriteImagesToParquet(prefixes["parquet_jpeg"], image_format="jpeg")
    _ = batches | "ParquetSmallGroups" >> WriteImagesToParquet(
        prefixes["parquet_small_groups"], row_group_bytes=SMALL_ROW_GROUP, codec="zstd", image_format="raw"
    )
    _ = batches | "TFRecordDefault" >> WriteImagesToTFRecord(prefixes["tfrecord_original"])
    _ = batches | "TFRecordRaw" >> WriteImagesToTFRecord(prefixes["tfrecord_raw"], image_format="raw")
    _ = batches | "TFRecordPng" >> WriteImagesToTFRecord(prefixes["tfrecord_png"], image_format="png")
    _ = batches | "TFRecordJpeg" >> WriteImagesToTFRecord(prefixes["tfrecord_jpeg"], image_format="jpeg")
    _ = batches | "TFRecordGzip" >> WriteImagesToTFRecord(
        prefixes["tfrecord_gzip"], file_name_suffix=".tfrecord.gz", image_format="raw")
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
    return {"globs": globs, "expected": _expected_images(tars), "jpegs": _member_bytes(tars), "counters": counters,
            "out": out, "root": root}


def _read_and_check(transform, check, *args):
    """Runs a reader; ``check(batches, *args)`` runs on all its ImageBatches as a Beam matcher."""
    with beam.Pipeline(options=PipelineOptions(RUNNER)) as p:
        assert_that(p | transform, lambda batches: check(list(batches), *args))


def _check_exact(batches, expected, batch_size, encoded=None):
    """Ids, paths, metadata and pixels as expected; ``encoded``: the bytes each image must carry (None: none;
    a bytes prefix: every image's encoded bytes start with it; a dict: exactly those bytes per path)."""
    _check_batches_group_one_tar(batches, batch_size)
    images = {image.image_path: image for batch in batches for image in batch}
    assert sorted(images) == sorted(expected)
    for path, (image_id, pixels, meta) in expected.items():
        image = images[path]
        assert image.image_id == image_id
        assert image.metadata == meta
        assert image.image_data.dtype == np.uint8
        np.testing.assert_array_equal(image.image_data, pixels, err_msg=path)
        if encoded is None:
            assert image.encoded is None, path
        elif isinstance(encoded, bytes):
            assert image.encoded.startswith(encoded), path
        else:
            assert image.encoded == encoded[path], path


def _check_batches_group_one_tar(batches, batch_size):
    assert batches
    for batch in batches:
        assert 1 <= len(batch) <= batch_size
        assert {image.image_path.split("/", 1)[0] for image in batch} == {batch.tar_path}


def _encoded_expectation(written, name):
    kind = name.split("_", 1)[1]
    return {"original": written["jpegs"], "png": b"\x89PNG\r\n\x1a\n"}.get(kind)


@pytest.mark.parametrize("name", ["parquet_original", "parquet_raw", "parquet_png", "parquet_small_groups"])
def test_parquet_round_trip__project_reader_gives_back_the_decoded_pixels_ids_paths_and_metadata(written, name):
    _read_and_check(ReadImagesFromParquet(written["globs"][name], batch_size=3), _check_exact, written["expected"], 3,
                    _encoded_expectation(written, name))


@pytest.mark.parametrize("name", ["tfrecord_original", "tfrecord_raw", "tfrecord_png", "tfrecord_gzip"])
def test_tfrecord_round_trip__project_reader_gives_back_the_decoded_pixels_ids_paths_and_metadata(written, name):
    _read_and_check(ReadImagesFromTFRecord(written["globs"][name], batch_size=3), _check_exact, written["expected"], 3,
                    _encoded_expectation(written, name))


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
            assert row["image"]["bytes"].startswith(magic) and row["image"]["path"] == row["image_path"]
            with Image.open(io.BytesIO(row["image"]["bytes"])) as img:
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
    assert len(per_step) == 10
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


_TF_KINDS = {"image/format": "bytes_list", "image/height": "int64_list", "image/width": "int64_list",
             "image/channels": "int64_list", "image/filename": "bytes_list", "image/source_id": "bytes_list",
             "image/metadata": "bytes_list"}


def _independent_examples(pattern, image_key):
    """image_path -> {feature: its one value} of every Example, checking each has exactly the documented keys."""
    example_class = _independent_example_class()
    kinds = {**_TF_KINDS, image_key: "bytes_list"}
    seen = {}
    for path in _glob(pattern):
        for record in _independent_records(path):
            feature = example_class.FromString(record).features.feature
            assert set(feature) == set(kinds)
            for name, kind in kinds.items():
                assert feature[name].WhichOneof("kind") == kind
                assert len(getattr(feature[name], kind).value) == 1
            value = {name: getattr(feature[name], kind).value[0] for name, kind in kinds.items()}
            seen[value["image/filename"].decode("utf-8")] = value
    return seen


def test_tfrecord_raw__parses_as_tf_train_examples_with_the_image_keys_and_pixels_under_image_raw(written):
    seen = _independent_examples(written["globs"]["tfrecord_raw"], "image/raw")
    assert sorted(seen) == sorted(written["expected"])
    for path, (image_id, pixels, meta) in written["expected"].items():
        value = seen[path]
        assert value["image/source_id"] == image_id.encode("utf-8")
        assert value["image/format"] == b"raw"
        assert (value["image/height"], value["image/width"], value["image/channels"]) == pixels.shape
        assert json.loads(value["image/metadata"].decode("utf-8")) == meta
        np.testing.assert_array_equal(np.frombuffer(value["image/raw"], np.uint8).reshape(pixels.shape), pixels)


def test_tfrecord_default__holds_each_jpeg_unchanged_under_image_encoded_with_format_jpeg(written):
    seen = _independent_examples(written["globs"]["tfrecord_original"], "image/encoded")
    assert sorted(seen) == sorted(written["expected"])
    for path, (image_id, pixels, meta) in written["expected"].items():
        value = seen[path]
        assert value["image/encoded"] == written["jpegs"][path]
        assert value["image/format"] == b"jpeg"
        assert value["image/source_id"] == image_id.encode("utf-8")
        assert (value["image/height"], value["image/width"], value["image/channels"]) == pixels.shape
        assert json.loads(value["image/metadata"].decode("utf-8")) == meta


def test_tfrecord_files_are_readable_by_tensorflow(written):
    tf = pytest.importorskip("tensorflow")
    spec = {k: tf.io.FixedLenFeature([], tf.string, default_value="") for k in ("image/encoded", "image/raw")}
    spec.update({k: tf.io.FixedLenFeature([], tf.string) for k in ("image/format", "image/filename",
                                                                     "image/source_id", "image/metadata")})
    spec.update({k: tf.io.FixedLenFeature([], tf.int64) for k in ("image/height", "image/width", "image/channels")})
    for name in ("tfrecord_raw", "tfrecord_original"):
        seen = {}
        for record in tf.data.TFRecordDataset(_glob(written["globs"][name])):
            ex = tf.io.parse_single_example(record, spec)
            if ex["image/format"].numpy() == b"raw":
                shape = tf.stack([ex["image/height"], ex["image/width"], ex["image/channels"]])
                pixels = tf.reshape(tf.io.decode_raw(ex["image/raw"], tf.uint8), shape)
            else:
                pixels = tf.io.decode_image(ex["image/encoded"], channels=3, expand_animations=False)
            seen[ex["image/filename"].numpy().decode()] = pixels.numpy()
        for path, (_, pixels, _) in written["expected"].items():
            if name == "tfrecord_raw":
                np.testing.assert_array_equal(seen[path], pixels)
            elif not path.endswith("a004.jpg"):  # TensorFlow ignores EXIF orientation
                assert seen[path].shape == pixels.shape


def test_parquet_is_readable_by_pandas_and_duckdb(written):
    pd = pytest.importorskip("pandas")
    duckdb = pytest.importorskip("duckdb")
    files = _glob(written["globs"]["parquet_raw"])
    frame = pd.concat([pd.read_parquet(f) for f in files])
    assert sorted(frame["image_path"]) == sorted(written["expected"])
    rows = duckdb.sql(f"SELECT image_id, height * width * channels AS n, octet_length(image_data) AS b "
                      f"FROM read_parquet({files!r})").fetchall()
    assert len(rows) == len(written["expected"]) and all(n == b for _, n, b in rows)


def test_parquet_default_output__is_readable_by_pandas_and_duckdb_with_the_jpeg_bytes_in_image_bytes(written):
    pd = pytest.importorskip("pandas")
    duckdb = pytest.importorskip("duckdb")
    files = _glob(written["globs"]["parquet_original"])
    frame = pd.concat([pd.read_parquet(f) for f in files])
    assert sorted(frame["image_path"]) == sorted(written["expected"])
    for _, row in frame.iterrows():
        assert row["image"]["bytes"] == written["jpegs"][row["image_path"]]
        assert row["image"]["path"] == row["image_path"]
    rows = duckdb.sql(f"SELECT image_path, image.bytes AS b, image.path AS p, height, width "
                      f"FROM read_parquet({files!r})").fetchall()
    assert sorted(r[0] for r in rows) == sorted(written["expected"])
    for path, data, inner_path, h, w in rows:
        assert data == written["jpegs"][path] and inner_path == path
        assert (h, w) == written["expected"][path][1].shape[:2]


def test_tar_reader__each_decoded_image_carries_its_members_own_bytes_as_encoded(read_tars, tmp_path):
    members = [(f"k{i}.jpg", make_jpeg(i, 30 + i, 20 + i)) for i in range(5)]
    write_tar(str(tmp_path / "00000.tar"), members)
    result = read_tars(str(tmp_path), batch_size=2)
    assert {k: image.encoded for k, image in result.by_member().items()} == dict(members)


# --- the default format: original JPEG bytes, in Hugging Face's Image storage -------------------------------


def test_parquet_default_output__uses_hugging_face_image_storage_and_describes_every_column(written):
    import pyarrow as pa

    for path in _glob(written["globs"]["parquet_original"]):
        arrow = pq.read_schema(path)
        assert arrow.names == ["image_id", "image_path", "height", "width", "channels", "image_format", "image",
                               "metadata"]
        image = arrow.field("image")
        assert image.type == pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
        assert [(f.name, f.nullable) for f in image.type] == [("bytes", True), ("path", True)]
        features = json.loads(arrow.metadata[b"huggingface"])["info"]["features"]
        assert features == {
            "image_id": {"dtype": "string", "_type": "Value"}, "image_path": {"dtype": "string", "_type": "Value"},
            "height": {"dtype": "int32", "_type": "Value"}, "width": {"dtype": "int32", "_type": "Value"},
            "channels": {"dtype": "int32", "_type": "Value"}, "image_format": {"dtype": "string", "_type": "Value"},
            "image": {"_type": "Image"}, "metadata": {"dtype": "string", "_type": "Value"},
        }
        assert set(pq.read_table(path, columns=["image_format"]).column(0).to_pylist()) == {"original"}


def test_parquet_image_bytes_are_not_dictionary_encoded_and_the_small_columns_are(written):
    for name, column in (("parquet_original", "image.bytes"), ("parquet_raw", "image_data")):
        meta = pq.ParquetFile(_glob(written["globs"][name])[0]).metadata.row_group(0)
        encodings = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
        assert "RLE_DICTIONARY" not in encodings[column], (name, encodings[column])
        assert "RLE_DICTIONARY" in encodings["image_path"]


def test_parquet_raw_output__keeps_the_earlier_columns_and_no_image_column(written):
    arrow = pq.read_schema(_glob(written["globs"]["parquet_raw"])[0])
    assert arrow.names == ["image_id", "image_path", "height", "width", "channels", "image_format", "image_data",
                           "metadata"]
    assert not (arrow.metadata or {}).get(b"huggingface")


def _load_with_hf_datasets(files, tmp_path, monkeypatch):
    """``datasets.load_dataset("parquet")`` offline, its caches in tmp_path (set before datasets is imported)."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf-cache"))
    return datasets, ds


def test_parquet_default_output__loads_in_hugging_face_datasets_as_pil_images_equal_to_the_decoded_pixels(
        written, tmp_path, monkeypatch):
    datasets, ds = _load_with_hf_datasets(_glob(written["globs"]["parquet_original"]), tmp_path, monkeypatch)
    assert ds.features["image"] == datasets.Image()
    assert ds.features["height"] == datasets.Value("int32") and ds.features["image_id"] == datasets.Value("string")
    assert ds.num_rows == len(written["expected"])
    for row in ds:
        image_id, pixels, meta = written["expected"][row["image_path"]]
        assert isinstance(row["image"], Image.Image)
        assert row["image_id"] == image_id and json.loads(row["metadata"]) == meta
        assert (row["image"].height, row["image"].width) == (row["height"], row["width"])
        np.testing.assert_array_equal(np.asarray(row["image"].convert("RGB")), pixels, err_msg=row["image_path"])


def test_exif_rotated_image__height_and_width_are_the_orientation_applied_size_and_the_bytes_keep_the_tag(
        written, tmp_path, monkeypatch):
    from beam_tarimg.jpeg import jpeg_dimensions

    path = "00000.tar/a004.jpg"  # written 60 wide x 40 high with EXIF orientation 6 (a quarter turn)
    jpeg = written["jpegs"][path]
    with Image.open(io.BytesIO(jpeg)) as img:
        assert img.getexif().get(0x0112) == 6
    assert jpeg_dimensions(jpeg) == (60, 40)  # the stored frame, as a decoder that ignores EXIF sees it
    decoded = written["expected"][path][1]
    assert decoded.shape == (60, 40, 3)  # the tar reader's decode applies the orientation
    files = _glob(written["globs"]["parquet_original"])
    row = [r for r in pq.read_table(files).to_pylist() if r["image_path"] == path][0]
    assert row["image"]["bytes"] == jpeg  # unchanged: the tag travels with the bytes
    assert (row["height"], row["width"], row["channels"]) == (60, 40, 3)  # what the decoded pixels are
    for name in ("parquet_raw", "parquet_png"):  # the same columns whatever the format
        other = [r for r in pq.read_table(_glob(written["globs"][name])).to_pylist() if r["image_path"] == path][0]
        assert (other["height"], other["width"]) == (60, 40)
    _, ds = _load_with_hf_datasets(files, tmp_path, monkeypatch)  # datasets >= 2.19 applies the orientation too
    hf = [r for r in ds if r["image_path"] == path][0]["image"]
    assert (hf.height, hf.width) == (60, 40)
    np.testing.assert_array_equal(np.asarray(hf.convert("RGB")), decoded)


# --- files written by earlier versions ----------------------------------------------------------------------


def _frame_record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


def _png(pixels) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "PNG")
    return buf.getvalue()


def test_readers_read_files_in_the_earlier_layout_raw_png_and_without_image_format(written, tmp_path):
    """As the sinks wrote them before ``original``: Parquet ``image_data`` holding raw or png bytes, TFRecord
    features named like the Parquet columns; each once with and once without ``image_format``."""
    import pyarrow as pa

    from beam_tarimg.tfrecordio import example_pb2

    expected = written["expected"]
    rows = []
    for i, (path, (image_id, pixels, meta)) in enumerate(sorted(expected.items())):
        fmt = "png" if i % 2 else "raw"
        rows.append({"image_id": image_id, "image_path": path, "height": pixels.shape[0], "width": pixels.shape[1],
                     "channels": pixels.shape[2], "image_format": fmt,
                     "image_data": _png(pixels) if fmt == "png" else pixels.tobytes(),
                     "metadata": json.dumps(meta)})
    old_schema = pa.schema([
        pa.field("image_id", pa.string(), False), pa.field("image_path", pa.string(), False),
        pa.field("height", pa.int32(), False), pa.field("width", pa.int32(), False),
        pa.field("channels", pa.int32(), False), pa.field("image_format", pa.string(), False),
        pa.field("image_data", pa.binary(), False), pa.field("metadata", pa.string(), False)])
    table = pa.Table.from_pylist(rows, schema=old_schema)
    pq.write_table(table, str(tmp_path / "old-00000-of-00002.parquet"))
    pq.write_table(table.drop_columns(["image_format"]), str(tmp_path / "old-00001-of-00002.parquet"))

    pb = example_pb2()
    for name, keys in (("old-a", ("image_id", "image_path", "image_format", "metadata")),
                       ("old-b", ("image_id", "image_path", "metadata"))):
        with open(tmp_path / f"{name}.tfrecord", "wb") as f:
            for row in rows:
                example = pb.Example()
                for key in keys:
                    example.features.feature[key].bytes_list.value.append(row[key].encode("utf-8"))
                for key in ("height", "width", "channels"):
                    example.features.feature[key].int64_list.value.append(row[key])
                example.features.feature["image_data"].bytes_list.value.append(row["image_data"])
                f.write(_frame_record(example.SerializeToString()))

    def check(batches):
        images = [image for batch in batches for image in batch]
        assert len(images) == 2 * len(expected)
        by_path = {}
        for image in images:
            by_path.setdefault(image.image_path, []).append(image)
        for path, (image_id, pixels, meta) in expected.items():
            for image in by_path[path]:
                assert (image.image_id, image.metadata) == (image_id, meta)
                np.testing.assert_array_equal(image.image_data, pixels, err_msg=path)

    _read_and_check(ReadImagesFromParquet(str(tmp_path / "old-*.parquet")), check)
    _read_and_check(ReadImagesFromTFRecord(str(tmp_path / "old-*.tfrecord")), check)


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


def test_sink_refuses_original_for_an_image_that_carries_no_encoded_bytes(tmp_path):
    from beam_tarimg.types import ImageBatch, ImageObject

    batch = ImageBatch("t.tar", [ImageObject("t.tar/x.jpg", "x", np.zeros((2, 2, 3), np.uint8))])
    with pytest.raises(Exception, match="cannot write 't.tar/x.jpg' as original: it carries no encoded bytes"):
        with beam.Pipeline(options=PipelineOptions(RUNNER)) as p:
            _ = p | beam.Create([batch]) | WriteImagesToParquet(str(tmp_path / "x"))


def test_sink_fails_with_a_clear_error_for_pixels_that_are_not_uint8(tmp_path):
    from beam_tarimg.types import ImageBatch, ImageObject

    batch = ImageBatch("t.tar", [ImageObject("t.tar/x.jpg", "x", np.zeros((2, 2, 3), np.float32))])
    with pytest.raises(Exception, match="must be uint8"):
        with beam.Pipeline(options=PipelineOptions(RUNNER)) as p:
            _ = p | beam.Create([batch]) | WriteImagesToParquet(str(tmp_path / "x"), image_format="raw")


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
        batches = p | beam.Create([ImageBatch(tar_name, images)])  # pixels made here: no JPEG bytes, so raw
        _ = batches | "Parquet" >> WriteImagesToParquet(str(tmp_path / "names"), image_format="raw")
        _ = batches | "TFRecord" >> WriteImagesToTFRecord(str(tmp_path / "names"), image_format="raw")
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
    expected = {  # written in the default format, original: the reader gives back the JPEG bytes too
        "00000.tar/caf\\xe9.jpg": ImageObject("00000.tar/caf\\xe9.jpg", "caf\\xe9", pixels, {}, data),
        "00000.tar/a\\\\b.jpg": ImageObject("00000.tar/a\\\\b.jpg", "a\\\\b", pixels, {}, data),
    }
    with beam.Pipeline(options=PipelineOptions(RUNNER)) as p:
        batches = p | ReadImagesFromTars(str(src), batch_size=BATCH)
        _ = batches | "Parquet" >> WriteImagesToParquet(str(tmp_path / "out"))
        _ = batches | "TFRecord" >> WriteImagesToTFRecord(str(tmp_path / "out"))
    _read_and_check(ReadImagesFromParquet(str(tmp_path / "out-*.parquet")), _check_same_images, expected)
    _read_and_check(ReadImagesFromTFRecord(str(tmp_path / "out-*.tfrecord")), _check_same_images, expected)
