"""The jobs' own Beam steps around ``ReadAllImagesFromTars`` and the sinks: failures as JSON lines (counted
by stage, with a bounded sample of reasons), the written files, and the progress reports.

Counters (namespace ``beam_tarimg``): ``failure_records``, ``failures_<stage>``; string sets
``files_written``, ``failure_examples``.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Dict

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_tarimg.transforms import NAMESPACE
from beam_tarimg.types import FailureStage, ImageFailure
from pipelines import progress

EXAMPLES_PER_STAGE = 3


class FailureToJsonFn(beam.DoFn):
    """An ImageFailure as one JSON line (tar, member, stage, error). Counters: failure_records, and
    failures_<stage> for each stage; string set failure_examples: the first few failures of each stage seen by
    each worker process (JSON, errors cut at 300 characters), so that a job can say why it lost inputs
    without holding its failures."""

    _examples_lock = threading.Lock()
    _examples_given: Dict[tuple, int] = {}  # per process and job: how many examples of each stage were recorded

    def __init__(self):
        self._job = uuid.uuid4().hex  # several jobs may run in one process (run(argv) from Python, tests)

    def setup(self):
        self._failures = Metrics.counter(NAMESPACE, "failure_records")
        self._by_stage = {stage: Metrics.counter(NAMESPACE, f"failures_{stage}") for stage in FailureStage.ALL}
        self._examples = Metrics.string_set(NAMESPACE, "failure_examples")

    def process(self, failure: ImageFailure):
        self._failures.inc()
        counter = self._by_stage.get(failure.stage)
        if counter is not None:
            counter.inc()
        progress.report(progress.FAILURES)
        record = failure.to_dict()
        with self._examples_lock:
            key = (self._job, failure.stage)
            given = self._examples_given.get(key, 0)
            if given < EXAMPLES_PER_STAGE:
                self._examples_given[key] = given + 1
                example = dict(record, error=str(record.get("error") or "")[:300])
                self._examples.add(json.dumps(example, ensure_ascii=False, sort_keys=True))
        yield json.dumps(record, ensure_ascii=False)


class RecordOutputFileFn(beam.DoFn):
    """Records each written file name in the string-set metric files_written."""

    def setup(self):
        self._files = Metrics.string_set(NAMESPACE, "files_written")

    def process(self, file_name):
        self._files.add(str(file_name))


class TarDoneFn(beam.DoFn):
    """Passes each tar on, then reports it done: the steps fused after this one have finished with an element
    when its ``yield`` returns (the SDK harness runs fused steps depth-first, one element at a time)."""

    def process(self, tar):
        yield tar
        progress.report(progress.TARS)


class CountImagesFn(beam.DoFn):
    """Passes each ImageBatch on and reports its images."""

    def process(self, batch):
        progress.report(progress.IMAGES, len(batch))
        yield batch
