"""The plugin on Beam's portable path: the path Flink and Spark use (a job service, SDK workers over the Fn API).

Run here with Beam's own Python job service and a worker pool that starts SDK worker processes
(``--environment_type=EXTERNAL``), two workers per job. Each test starts and stops its own services
(tests/_portable.py): free ports, bounded waits, process groups killed on the way out, and a job whose SDK
worker died fails within seconds instead of hanging.

``redistribute="auto"`` means "encoded" on the PortableRunner: encoded batches are Reshuffled before the
decode, so these tests run that shape, with EncodedBatch and ImageBatch crossing process boundaries.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import importlib.util
import json
import os
import stat
import time

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from _portable import (
    THIS_FILE,
    expected_rows,
    group_members,
    parse_output_line,
    pillow_reference,
    portable_services,
    probe_rows_by_id,
    read_probe_output,
    service_env,
)
from beam_tarimg import ReadAllImagesFromTars, ReadImagesFromTars
from beam_tarimg.sample import make_sample_dataset

BATCH = 4
WORKERS = 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """4 tars x 6 ImageNet-like JPEGs with sidecars, and what a correct reader yields (decoded with Pillow)."""
    folder = tmp_path_factory.mktemp("tars")
    paths = make_sample_dataset(str(folder), num_tars=4, images_per_tar=6, seed=11)
    return str(folder), paths, pillow_reference(paths)


def _portable_options(job_port=1, pool_port=2):
    return PipelineOptions([
        "--runner=PortableRunner", f"--job_endpoint=localhost:{job_port}",
        "--environment_type=EXTERNAL", f"--environment_config=localhost:{pool_port}",
    ])


# ---------------------------------------------------------------------------------------------------------------
# Construction only (no services)


def test_portable_runner__auto_redistribute_reshuffles_encoded_batches_before_the_decode(dataset):
    p = beam.Pipeline(options=_portable_options())
    assert ReadAllImagesFromTars().redistribute_mode(p) == "encoded"
    _ = p | "Read" >> ReadImagesFromTars(dataset[0], batch_size=BATCH)
    labels = {t.unique_name for t in p.to_runner_api().components.transforms.values()}
    assert any(label.endswith("/SpreadEncodedBatches") for label in labels), sorted(labels)
    assert any(label.endswith("/DecodeBatches") for label in labels), sorted(labels)
    assert not any("ReadAndDecodeTars" in label for label in labels), sorted(labels)


def test_portable_runner__accelerator_and_num_threads_become_hints_on_the_decode_step_only(dataset):
    accelerator = "type:nvidia-l4;count:1;install-nvidia-driver"
    p = beam.Pipeline(options=_portable_options())
    _ = p | "Read" >> ReadImagesFromTars(dataset[0], batch_size=BATCH, num_threads=3, accelerator=accelerator)
    proto = p.to_runner_api()
    hints = {
        t.unique_name: dict(proto.components.environments[t.environment_id].resource_hints)
        for t in proto.components.transforms.values() if t.environment_id
    }
    decode = {name: h for name, h in hints.items() if name.endswith("/ParDo(_DecodeBatchesFn)")}
    assert decode and all(
        h.get("beam:resources:cpu_count:v1") == b"3" and h.get("beam:resources:accelerator:v1") == accelerator.encode()
        for h in decode.values()
    ), decode
    others = [h for name, h in hints.items() if name not in decode and "ParDo(" in name]
    assert others and not any(others), "only the decode step may carry hints"


def test_portable_runner__num_threads_alone_sets_no_hint_so_the_decode_step_stays_fusable(dataset):
    p = beam.Pipeline(options=_portable_options())
    _ = p | "Read" >> ReadImagesFromTars(dataset[0], batch_size=BATCH, num_threads=3)
    proto = p.to_runner_api()
    assert not any(dict(env.resource_hints) for env in proto.components.environments.values())


# ---------------------------------------------------------------------------------------------------------------
# Jobs through the job service and worker pool


@pytest.mark.slow
def test_portable_runner__two_sdk_workers_decode_every_image_once_with_pillows_pixels(dataset, tmp_path):
    folder, _, reference = dataset
    out = str(tmp_path / "out" / "probe")
    with portable_services(tmp_path / "logs") as services:
        output = services.run_job(
            [str(THIS_FILE), "probe-job", "--input", folder, "--output", out, "--batch_size", str(BATCH),
             *services.pipeline_flags(WORKERS)],
        )
        started = services.workers_started()

    rows = read_probe_output(out)
    assert probe_rows_by_id(rows) == expected_rows(reference)
    assert started == WORKERS, f"the pool started {started} SDK workers"
    pids = {row["pid"] for row in rows}
    assert len(pids) == WORKERS, f"images were decoded in {len(pids)} processes"
    counters, steps = parse_output_line(output, "METRICS"), parse_output_line(output, "STEPS")
    assert counters["decoders_built"] == WORKERS, counters  # one DALI pipeline per worker process
    assert counters["images_decoded_cpu"] == len(reference), counters
    assert counters["tars_read"] == 4, counters
    # The "encoded" shape ran: decoding happened in DecodeBatches, after the Reshuffle, not in the fused step.
    assert all(step.endswith("/DecodeBatches/ParDo(_DecodeBatchesFn)") for step in steps["decoders_built"]), steps


def _tar_to_parquet_module():
    if importlib.util.find_spec("pipelines.tar_to_parquet") is None:
        pytest.skip("pipelines/tar_to_parquet.py does not exist yet")
    return importlib.import_module("pipelines.tar_to_parquet")


def _parquet_rows(folder) -> dict:
    import pyarrow.parquet as pq

    files = sorted(f for f in glob.glob(os.path.join(folder, "*")) if os.path.isfile(f))
    assert files, f"no output files in {folder}"
    rows = {}
    for f in files:
        for row in pq.read_table(f).to_pylist():
            assert row["image_id"] not in rows, f"image {row['image_id']} written twice"
            rows[row["image_id"]] = {
                "image_path": row["image_path"],
                "shape": [row["height"], row["width"], row["channels"]],
                "sha256": hashlib.sha256(row["image_data"]).hexdigest(),
                "metadata": json.loads(row["metadata"]) if row["metadata"] else {},
            }
    return rows


@pytest.mark.slow
def test_portable_runner__tar_to_parquet_with_two_sdk_workers_writes_what_the_fn_api_runner_writes(dataset, tmp_path):
    module = _tar_to_parquet_module()
    folder, _, reference = dataset
    common = ["--input", folder, "--batch_size", str(BATCH), "--image_format", "raw"]  # pixels, to compare

    module.run([*common, "--output", str(tmp_path / "fn" / "images"), "--failures", str(tmp_path / "fn-failures"),
                "--runner", "FnApiRunner"])
    with portable_services(tmp_path / "logs") as services:
        services.run_job(
            ["-m", "pipelines.tar_to_parquet", *common, "--output", str(tmp_path / "portable" / "images"),
             "--failures", str(tmp_path / "portable-failures"), *services.pipeline_flags(WORKERS)],
        )
        started = services.workers_started()

    fn_rows, portable_rows = _parquet_rows(tmp_path / "fn"), _parquet_rows(tmp_path / "portable")
    assert started == WORKERS, f"the pool started {started} SDK workers"
    assert sorted(portable_rows) == sorted(fn_rows) == sorted(reference)
    assert portable_rows == fn_rows
    assert {k: v["sha256"] for k, v in portable_rows.items()} == {k: v["sha256"] for k, v in reference.items()}


@pytest.mark.slow
def test_portable_runner__a_dead_sdk_worker_fails_the_job_within_seconds_instead_of_hanging(dataset, tmp_path):
    """The pool starts workers with the bare command ``python``; here that is a program that exits at once."""
    fake_bin = tmp_path / "fake-bin"
    fake_bin.mkdir()
    fake_python = fake_bin / "python"
    fake_python.write_text("#!/bin/sh\necho 'fake python: exiting' >&2\nexit 1\n")
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IXUSR)

    groups = []
    start = time.monotonic()
    with pytest.raises(AssertionError, match="an SDK worker died") as failure:
        with portable_services(tmp_path / "logs", env=service_env(path_first=str(fake_bin))) as services:
            groups += [services.job_service.proc.pid, services.worker_pool.proc.pid]
            services.run_job(
                [str(THIS_FILE), "probe-job", "--input", dataset[0], "--output", str(tmp_path / "out" / "probe"),
                 *services.pipeline_flags(WORKERS)],
                timeout_s=120,
            )
    assert time.monotonic() - start < 60
    assert "fake python: exiting" in str(failure.value)  # the pool's log is in the error
    for pgid in groups:  # the services and everything they started are gone
        assert group_members(pgid) == [], f"processes of group {pgid} outlived the test"
