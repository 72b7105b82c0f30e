"""Jobs reading and writing s3:// and gs://, against servers a user could run: moto's S3 server and the
GCS emulator (``gcp-storage-emulator``), both started here on 127.0.0.1 (free ports, bounded waits, stopped
at the end). Each job runs as ``python -m pipelines.tar_to_parquet`` and must write the rows a local run
writes, with the failures file only when something was lost (Beam's S3 filesystem cannot write an empty
object), and refuse or --overwrite an existing prefix in the bucket as it does locally.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import digest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300
BUCKET = "beam-tarimg-test"

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def _job(*args, env=None):
    proc = subprocess.run([sys.executable, "-m", "pipelines.tar_to_parquet", "--include_metadata", "--quiet",
                           "--preview_rows", "0", "--runner", "FnApiRunner", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT_S, env={**os.environ, **(env or {})})
    return proc


def _rows(parquet_files) -> dict:
    """image_id -> every column of its row (bytes as digests), over Parquet files given as bytes."""
    rows = {}
    for data in parquet_files:
        for row in pq.read_table(io.BytesIO(data)).to_pylist():
            assert row["image_id"] not in rows
            rows[row["image_id"]] = digest(row)
    return rows


@pytest.fixture(scope="module")
def local_rows(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    proc = _job("--input", str(shards), "--output", str(out / "images"))
    assert proc.returncode == 0, proc.stderr
    files = sorted(p for p in out.iterdir() if p.name.endswith(".parquet"))
    return _rows([p.read_bytes() for p in files])


# --- S3: moto's server -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        _wait_for_port(port)
        import boto3

        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        flags = ["--s3_endpoint_url", endpoint, "--s3_access_key_id", "testing",
                 "--s3_secret_access_key", "testing", "--s3_region_name", "us-east-1"]
        yield client, flags
    finally:
        server.stop()


def _s3_keys(client, prefix):
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []))


def test_s3__input_output_and_failures_match_a_local_run_and_no_empty_object_is_written(shards, local_rows, s3):
    client, flags = s3
    for tar in sorted(os.listdir(shards)):
        client.upload_file(str(shards / tar), BUCKET, f"in/{tar}")
    out = f"s3://{BUCKET}/out"

    # Nothing lost: no failures object (an empty one is what S3 rejects from Beam's uploader).
    clean = _job("--input", f"s3://{BUCKET}/in/0000[01].tar", "--output", f"{out}/images",
                 "--failures", f"{out}/failures.jsonl", *flags)
    assert clean.returncode == 0, clean.stderr
    assert "images written   12" in clean.stdout and "none written" in clean.stdout
    first_keys = _s3_keys(client, "out/")
    assert first_keys and all(k.startswith("out/images-") and k.endswith(".parquet") for k in first_keys)

    # Into the same prefix: refused, then --overwrite replaces the earlier run.
    refused = _job("--input", f"s3://{BUCKET}/in/", "--output", f"{out}/images", *flags)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr, refused.stderr
    full = _job("--input", f"s3://{BUCKET}/in/", "--output", f"{out}/images",
                "--failures", f"{out}/failures.jsonl", "--overwrite", *flags)
    assert full.returncode == 0, full.stderr
    keys = _s3_keys(client, "out/")
    shard_keys = [k for k in keys if k.endswith(".parquet")]
    assert set(keys) == {*shard_keys, "out/failures.jsonl"} and not any("beam-temp" in k for k in keys)
    rows = _rows([client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in shard_keys])
    assert rows == local_rows and len(rows) == 13
    failures = client.get_object(Bucket=BUCKET, Key="out/failures.jsonl")["Body"].read().decode().splitlines()
    assert [json.loads(line)["tar"] for line in failures] == [f"s3://{BUCKET}/in/00002.tar"]


@pytest.mark.parametrize("flag", ["--output", "--failures"])
def test_s3__an_output_in_a_missing_bucket_is_one_line_without_beams_traceback(shards, s3, tmp_path, flag):
    _, flags = s3
    paths = {"--output": str(tmp_path / "images"), flag: "s3://no-such-bucket/out/x"}
    proc = _job("--input", str(shards), *[a for kv in paths.items() for a in kv], *flags)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{flag} 's3://no-such-bucket/out/x' is not writable" in lines[0], proc.stderr


_OFFLINE = {  # nothing a job does may reach past this machine: no credential lookup, no instance metadata
    "AWS_EC2_METADATA_DISABLED": "true", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "HTTP_PROXY": "", "HTTPS_PROXY": "", "http_proxy": "", "https_proxy": "", "NO_PROXY": "*", "no_proxy": "*",
}


@pytest.mark.parametrize("how", ["--s3_endpoint_url", "no endpoint flag: boto3's own endpoint"])
def test_s3__an_unreachable_endpoint_is_one_line_naming_the_endpoint_flags_before_any_retry(tmp_path, how):
    # Nothing listens on this loopback port. Without --s3_endpoint_url, the endpoint is boto3's own choice,
    # pointed at the same port through AWS_ENDPOINT_URL_S3 (so that no packet leaves the machine).
    endpoint = f"http://127.0.0.1:{_free_port()}"
    env = dict(_OFFLINE)
    if how == "--s3_endpoint_url":
        flags = ["--s3_endpoint_url", endpoint]
    else:
        flags = []
        env["AWS_ENDPOINT_URL_S3"] = endpoint
        with pytest.MonkeyPatch.context() as mp:  # where this boto3 would go (older ones ignore the variable)
            for k, v in env.items():
                mp.setenv(k, v)
            import boto3

            resolved = boto3.session.Session().client("s3", region_name="us-east-1").meta.endpoint_url
        if resolved != endpoint:
            pytest.skip(f"boto3 ignores AWS_ENDPOINT_URL_S3 here: the job would go to {resolved}")
    proc = _job("--input", "s3://some-bucket/shards/*.tar", "--output", str(tmp_path / "images"), *flags,
                env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the S3 endpoint " + endpoint in lines[0], proc.stderr
    assert "--s3_endpoint_url" in lines[0] and "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []


# --- GCS: the emulator -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gcs():
    from gcp_storage_emulator.server import create_server

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    try:
        _wait_for_port(port)
        host = f"http://127.0.0.1:{port}"
        os.environ["STORAGE_EMULATOR_HOST"] = host  # for this process's client only
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(project="test", credentials=AnonymousCredentials())
        yield client.bucket(BUCKET), {"STORAGE_EMULATOR_HOST": host}
    finally:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
        server.stop()


def test_gcs__input_output_and_failures_match_a_local_run(shards, local_rows, gcs):
    bucket, env = gcs
    for tar in sorted(os.listdir(shards)):
        bucket.blob(f"in/{tar}").upload_from_filename(str(shards / tar))
    out = f"gs://{BUCKET}/out"
    proc = _job("--input", f"gs://{BUCKET}/in/*.tar", "--output", f"{out}/images",
                "--failures", f"{out}/failures.jsonl", env=env)
    assert proc.returncode == 0, proc.stderr
    names = sorted(b.name for b in bucket.list_blobs(prefix="out/"))
    shard_names = [n for n in names if n.endswith(".parquet")]
    assert set(names) == {*shard_names, "out/failures.jsonl"}, names
    rows = _rows([bucket.blob(n).download_as_bytes() for n in shard_names])
    assert rows == local_rows and len(rows) == 13
    failures = bucket.blob("out/failures.jsonl").download_as_bytes().decode().splitlines()
    assert [json.loads(line)["tar"] for line in failures] == [f"gs://{BUCKET}/in/00002.tar"]

    again = _job("--input", f"gs://{BUCKET}/in/*.tar", "--output", f"{out}/images", env=env)
    assert again.returncode == 2 and "--overwrite" in again.stderr, again.stderr
