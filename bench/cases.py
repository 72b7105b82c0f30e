"""The benchmark cases: what each one runs, on which corpus set, with which allocator setting."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

# glibc malloc: the default, and the setting that removes the page faults of fresh ~0.5 MB output buffers
# (see FIELD-NOTES.md: up to 2x in decode throughput on these VMs).
ALLOC_DEFAULT = "glibc default"
ALLOC_TUNED = "tuned"
TUNED_ENV = {"MALLOC_MMAP_THRESHOLD_": "67108864", "MALLOC_TRIM_THRESHOLD_": "268435456"}
ALLOCATOR_NOTE = {
    ALLOC_DEFAULT: "glibc default (no MALLOC_* variables)",
    ALLOC_TUNED: "MALLOC_MMAP_THRESHOLD_=67108864 MALLOC_TRIM_THRESHOLD_=268435456",
}

DIRECT_MP = ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers={cores}"]
FNAPI = ["--runner=FnApiRunner"]


@dataclass(frozen=True)
class Case:
    name: str
    group: str  # limit | dali | breakdown | reader | pipeline | memory
    kind: str  # the worker function (bench.worker.KINDS)
    corpus: str  # imagenet | hd | mem-500 | mem-5000
    title: str
    allocator: str = ALLOC_DEFAULT
    params: Dict = field(default_factory=dict)
    passes: int = 3  # full run: N = passes x the corpus set; the short run is N/4
    marginal: bool = True  # False: one size only (memory cases), rate = N / time
    quick: bool = True  # part of --quick
    needs: Optional[str] = None  # a module that must exist, else the case is skipped

    @property
    def alloc_env(self) -> Dict[str, str]:
        return dict(TUNED_ENV) if self.allocator == ALLOC_TUNED else {}


CASES: List[Case] = [
    # 1. The limit: simplejpeg (libjpeg-turbo) in one process per core, bytes already in memory.
    Case("limit", "limit", "limit", "imagenet", "simplejpeg, 1 process/core, bytes in memory",
         ALLOC_TUNED, {"procs": "cores"}),
    Case("limit-glibc", "limit", "limit", "imagenet", "simplejpeg, 1 process/core, default allocator",
         ALLOC_DEFAULT, {"procs": "cores"}, quick=False),
    # 2. DALI alone, no Beam.
    Case("dali-external", "dali", "dali_external", "imagenet",
         "DALI CPU, external_source from memory, pipelined, batch 100, threads=cores", params={"batch": 100}),
    Case("dali-webdataset", "dali", "dali_webdataset", "imagenet",
         "DALI CPU, readers.webdataset on the tars, batch 100, threads=cores", params={"batch": 100}),
    # Breakdown of the reader: its decode core alone, its tar reading alone (one process each).
    Case("core-decoder", "breakdown", "core", "imagenet",
         "beam_tarimg ImageDecoder.decode alone, as the reader calls it, batch 100, threads=cores",
         params={"batch": 100}),
    Case("core-decoder-inproc", "breakdown", "core", "imagenet",
         "ImageDecoder.decode alone, isolation='none' (DALI in this process: no crash containment), batch 100",
         params={"batch": 100, "isolation": "none"}),
    Case("core-decoder-resize", "breakdown", "core", "imagenet",
         "ImageDecoder.decode alone with resize=Resize(256, crop=224) (224x224x3 uint8 out), batch 100",
         params={"batch": 100, "resize": (256, 224)}),
    Case("core-tario", "breakdown", "tario", "imagenet", "beam_tarimg read_tar alone (no decode), 1 process",
         params={"batch": 100}),
    # 3. The reader: ReadImagesFromTars -> count (CombineGlobally), no sink.
    Case("reader-mp", "reader", "reader", "imagenet",
         "ReadImagesFromTars, DirectRunner multi_processing, 1 worker/core, num_threads default (=cores)",
         params={"runner": DIRECT_MP}),
    Case("reader-mp-inproc", "reader", "reader", "imagenet",
         "ReadImagesFromTars, DirectRunner multi_processing, isolation='none' (no crash containment)",
         params={"runner": DIRECT_MP, "isolation": "none"}),
    Case("reader-mp-t1", "reader", "reader", "imagenet",
         "ReadImagesFromTars, DirectRunner multi_processing, 1 worker/core, num_threads=1",
         params={"runner": DIRECT_MP, "num_threads": 1}, quick=False),
    Case("reader-mp-tuned", "reader", "reader", "imagenet",
         "ReadImagesFromTars, DirectRunner multi_processing, num_threads default, tuned allocator",
         ALLOC_TUNED, {"runner": DIRECT_MP}, quick=False),
    Case("reader-fnapi", "reader", "reader", "imagenet",
         "ReadImagesFromTars, FnApiRunner in-process, num_threads default (=cores)", params={"runner": FNAPI}),
    # 4. The pipelines/ jobs end to end.
    Case("tar-to-parquet", "pipeline", "pipeline", "imagenet",
         "pipelines.tar_to_parquet, default flags (--image_format original: the JPEG bytes), DirectRunner mp",
         params={"module": "pipelines.tar_to_parquet", "runner": DIRECT_MP, "flags": ["--preview_rows=0"]}, passes=2,
         needs="pipelines.tar_to_parquet"),
    Case("tar-to-parquet-raw", "pipeline", "pipeline", "imagenet",
         "pipelines.tar_to_parquet --image_format raw (decoded pixels, the default before), DirectRunner mp",
         params={"module": "pipelines.tar_to_parquet", "runner": DIRECT_MP,
                 "flags": ["--preview_rows=0", "--image_format=raw"]}, passes=2, needs="pipelines.tar_to_parquet"),
    Case("tar-to-tfrecord", "pipeline", "pipeline", "imagenet", "pipelines.tar_to_tfrecord, DirectRunner mp",
         params={"module": "pipelines.tar_to_tfrecord", "runner": DIRECT_MP, "flags": ["--preview_rows=0"]}, passes=2,
         needs="pipelines.tar_to_tfrecord"),
    # 1080p: the same three levels.
    Case("limit-hd", "limit", "limit", "hd", "1080p: simplejpeg, 1 process/core, bytes in memory",
         ALLOC_TUNED, {"procs": "cores"}, passes=4),
    Case("dali-external-hd", "dali", "dali_external", "hd", "1080p: DALI CPU, external_source, batch 100",
         params={"batch": 100}, passes=4),
    Case("core-decoder-hd", "breakdown", "core", "hd", "1080p: ImageDecoder.decode alone, batch 100",
         params={"batch": 100}, passes=4, quick=False),
    Case("core-decoder-resize-hd", "breakdown", "core", "hd",
         "1080p: ImageDecoder.decode alone with resize=Resize(256, crop=224), batch 100",
         params={"batch": 100, "resize": (256, 224)}, passes=4, quick=False),
    Case("reader-mp-hd", "reader", "reader", "hd", "1080p: ReadImagesFromTars, DirectRunner multi_processing",
         params={"runner": DIRECT_MP}, passes=4),
    # 5. Memory: one worker (FnApiRunner in-process), one tar of 500 vs 5,000 images.
    Case("memory-500", "memory", "reader", "mem-500", "peak RSS, FnApiRunner in-process, one 500-image tar",
         params={"runner": FNAPI}, passes=1, marginal=False),
    Case("memory-5000", "memory", "reader", "mem-5000", "peak RSS, FnApiRunner in-process, one 5,000-image tar",
         params={"runner": FNAPI}, passes=1, marginal=False),
]

BY_NAME = {c.name: c for c in CASES}


def get(name: str) -> Case:
    try:
        return BY_NAME[name]
    except KeyError:
        raise SystemExit(f"unknown case {name!r}; cases: {', '.join(BY_NAME)}") from None
