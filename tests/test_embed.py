"""``python -m pipelines.embed`` as a user runs it: real tars, a real ONNX model (built here), the FnApiRunner.

The rows must equal the same model run directly with onnxruntime on the reference decode of the same JPEGs
(Pillow, which DALI's pixels equal on ordinary JPEGs); what the job loses is in its failures file; exit codes
tell.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_jpeg, pillow_rgb, write_tar

pytest.importorskip("onnxruntime")
from test_inference import CLIP_MEAN, CLIP_STD, EMBEDDING_DIM, build_embedding_model, run_directly  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300
CORRUPT = b"\xff\xd8\xff\xe0" + b"this is not the rest of a JPEG" * 4


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pipelines.embed", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two tars of 48x40 JPEGs (5 and 4) and a third with one more and a corrupt one: 10 images, 1 failure."""
    root = tmp_path_factory.mktemp("embed-in")
    jpegs = {}
    for t, n in enumerate((5, 4, 1)):
        members = [(f"s{t}/{i:04d}.jpg", make_jpeg(100 * t + i, width=48, height=40)) for i in range(n)]
        jpegs.update({name[:-4]: data for name, data in members})
        if t == 2:
            members.append(("broken.jpg", CORRUPT))
        write_tar(root / f"{t:05d}.tar", members)
    return root, jpegs


def test_embed_job__rows_equal_onnxruntime_on_the_decoded_pixels_and_the_failures_file_holds_the_rest(
        data, tmp_path, monkeypatch):
    root, jpegs = data
    model = build_embedding_model(tmp_path / "model.onnx")
    out = tmp_path / "out"
    proc = _cli("--input", str(root), "--output", str(out / "embeddings"), "--model", model,
                "--mean", ",".join(map(str, CLIP_MEAN)), "--std", ",".join(map(str, CLIP_STD)),
                "--batch_size", "3", "--failures", str(out / "failures.jsonl"), "--quiet", "--runner", "FnApiRunner")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no Beam noise
    assert "images written   10" in proc.stdout and "failures         1 (1 images lost)" in proc.stdout
    assert "dimension" in proc.stdout and f"{EMBEDDING_DIM} floats" in proc.stdout  # the preview

    files = sorted(p for p in os.listdir(out) if p.endswith(".parquet"))
    table = pa.concat_tables([pq.read_table(out / f) for f in files])
    assert table.schema.names == ["image_id", "image_path", "embedding"]
    assert table.schema.field("embedding").type == pa.list_(pa.field("element", pa.float32(), nullable=False))
    rows = table.to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(jpegs)  # every image exactly once
    assert all(r["image_path"] == f"{r['image_id'].split('/')[0][1:].zfill(5)}.tar/{r['image_id']}.jpg"
               for r in rows)
    ids = sorted(jpegs)
    pixels = np.stack([pillow_rgb(jpegs[i]) for i in ids]).astype(np.float32)
    direct = run_directly(model, ((pixels - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)).transpose(0, 3, 1, 2))
    got = np.array([r["embedding"] for r in sorted(rows, key=lambda r: r["image_id"])], dtype=np.float32)
    np.testing.assert_allclose(got, direct, rtol=1e-5, atol=1e-6)

    (failure,) = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert (os.path.basename(failure["tar"]), failure["member"], failure["stage"]) == ("00002.tar", "broken.jpg",
                                                                                      "decode")
    # Opens as it is: pandas, DuckDB, Hugging Face datasets.
    from test_sinks import _load_with_hf_datasets

    datasets, ds = _load_with_hf_datasets([str(out / f) for f in files], tmp_path, monkeypatch)
    assert ds.features["embedding"] == datasets.Sequence(datasets.Value("float32")) or str(
        ds.features["embedding"]) == "List(Value('float32'))"
    assert len(ds) == 10 and len(ds[0]["embedding"]) == EMBEDDING_DIM
    import duckdb
    import pandas as pd

    frame = pd.read_parquet(out / files[0])
    assert frame["embedding"].iloc[0].dtype == np.float32 and len(frame["embedding"].iloc[0]) == EMBEDDING_DIM
    pattern = str(out / "*.parquet")
    assert duckdb.sql(f"SELECT count(*), min(len(embedding)), max(len(embedding)) FROM read_parquet('{pattern}')"
                      ).fetchall() == [(10, EMBEDDING_DIM, EMBEDDING_DIM)]


def test_embed_job__a_model_that_refuses_every_batch_exits_3_with_inference_failures_for_every_image(
        data, tmp_path):
    root, jpegs = data
    model = build_embedding_model(tmp_path / "fixed.onnx", height=224, width=224)  # the images are 40x48
    out = tmp_path / "out"
    proc = _cli("--input", str(root), "--output", str(out / "embeddings"), "--model", model,
                "--failures", str(out / "failures.jsonl"), "--quiet", "--runner", "FnApiRunner")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert os.listdir(out) == ["failures.jsonl"]  # no shard without a row
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["member"] for f in failures if f["stage"] == "inference") == sorted(f"{i}.jpg" for i in jpegs)
    assert [f["member"] for f in failures if f["stage"] == "decode"] == ["broken.jpg"]
    err = proc.stderr.splitlines()
    assert err[0].endswith("3 tars matched but no image was written; 11 failures"), proc.stderr
    assert "failures by stage: decode 1, inference 10" in err[1]
    assert "model failed on a batch" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("case,args,message", [
    ("no model", [], "the following arguments are required: --model"),
    ("missing model", ["--model", "{tmp}/nothing.onnx"], "no such file"),
    ("not a model", ["--model", "{tar}"], "is not an ONNX model"),
    ("wrong layout", ["--model", "{hwc}"], "try the other --layout"),
    ("wrong dtype", ["--model", "{chw}", "--dtype", "uint8"], "takes FLOAT, not uint8"),
    ("crop without resize", ["--model", "{chw}", "--crop", "224"], "--crop needs --resize"),
    ("bad mean", ["--model", "{chw}", "--mean", "1,2"], "argument --mean"),
    ("zero std", ["--model", "{chw}", "--std", "0"], "argument --std: must be > 0"),
    ("bad size", ["--model", "{chw}", "--resize", "0x3"], "argument --resize"),
])
def test_embed_usage_errors_come_back_before_beam_is_imported(data, tmp_path, case, args, message):
    root, _ = data
    models = {"{chw}": build_embedding_model(tmp_path / "chw.onnx"),
              "{hwc}": build_embedding_model(tmp_path / "hwc.onnx", layout="HWC"),
              "{tar}": str(root / "00000.tar"), "{tmp}": str(tmp_path)}
    for key, value in models.items():
        args = [a.replace(key, value) for a in args]
    argv = ["--input", str(root), "--output", str(tmp_path / "o" / "embeddings"), *args]
    probe = (
        "import sys\n"
        "from pipelines import embed\n"
        "from pipelines.options import UsageError\n"
        "try:\n"
        f"    embed.run({argv!r})\n"
        "except UsageError as e:\n"
        "    print('USAGE', e)\n"
        "print('HEAVY', sorted(m for m in ('apache_beam', 'nvidia.dali', 'pyarrow') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert "USAGE" in proc.stdout and message in proc.stdout, (proc.stdout, proc.stderr)
    assert "HEAVY []" in proc.stdout
    assert not (tmp_path / "o").exists() or os.listdir(tmp_path / "o") == []


def test_embed_resize_flags_become_a_resize_on_decode_and_no_numpy_preprocessing():
    # With --resize the decode resizes, crops and normalises (pipelines.embed.model_input): the flags are
    # beam_tarimg.Resize's arguments, and no numpy Normalize runs on the batches.
    from beam_tarimg import Resize
    from pipelines.embed import model_input
    from pipelines.options import EMBED_FLAGS, parse_args

    args, _ = parse_args(["--input", "x", "--output", "o", "--model", "m.onnx", "--resize", "256", "--crop",
                          "224", "--interpolation", "cubic", "--mean", "127.5", "--std", "1,2,3"], "embed", "",
                         flags=EMBED_FLAGS)
    options, preprocess = model_input(args)
    assert preprocess is None
    assert options == {"resize": Resize(256, crop=224, interpolation="cubic", dtype="float32", layout="CHW",
                                        mean=127.5, std=(1, 2, 3))}


def test_embed_job_with_resize__variable_size_jpegs_give_rows_equal_to_onnxruntime_on_the_same_resized_decode(
        tmp_path, read_tars):
    import beam_tarimg

    data = tmp_path / "in"
    data.mkdir()
    sizes = [(48, 40), (64, 30), (30, 64), (100, 75), (40, 48)]
    jpegs = {f"v{i}": make_jpeg(200 + i, width=w, height=h) for i, (w, h) in enumerate(sizes)}
    write_tar(data / "00000.tar", [(f"{k}.jpg", v) for k, v in jpegs.items()] + [("broken.jpg", CORRUPT)])
    model = build_embedding_model(tmp_path / "model.onnx", height=24, width=24)  # a fixed input, as CLIP's
    out = tmp_path / "out"
    flags = ["--resize", "28", "--crop", "24", "--interpolation", "cubic", "--mean", ",".join(map(str, CLIP_MEAN)),
             "--std", ",".join(map(str, CLIP_STD))]
    proc = _cli("--input", str(data), "--output", str(out / "embeddings"), "--model", model, *flags,
                "--failures", str(out / "failures.jsonl"), "--quiet", "--runner", "FnApiRunner")
    assert proc.returncode == 0, proc.stderr
    rows = pa.concat_tables([pq.read_table(out / f) for f in sorted(os.listdir(out)) if f.endswith(".parquet")])
    got = {r["image_id"]: r["embedding"] for r in rows.to_pylist()}
    assert sorted(got) == sorted(jpegs)
    assert [json.loads(line)["member"] for line in (out / "failures.jsonl").read_text().splitlines()] == [
        "broken.jpg"]
    resize = beam_tarimg.Resize(28, crop=24, interpolation="cubic", dtype="float32", mean=CLIP_MEAN,
                                std=CLIP_STD, layout="CHW")
    decoded = {i.image_id: i.image_data for i in read_tars(str(data), resize=resize).images}
    assert {a.shape for a in decoded.values()} == {(3, 24, 24)}
    ids = sorted(jpegs)
    direct = run_directly(model, np.stack([decoded[i] for i in ids]))
    np.testing.assert_allclose(np.array([got[i] for i in ids], np.float32), direct, rtol=1e-5, atol=1e-6)
