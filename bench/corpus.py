"""The benchmark corpus: webdataset-style tars built with ``beam_tarimg.sample``, cached by parameters.

Three sets, each in its own folder named by its parameters (so a changed parameter builds a new one):

* ``imagenet``: ImageNet-like JPEGs (~300-560 x 250-480 px, ~33 KB), 8 tars x 500 images, sidecars on.
* ``hd``: 1920x1080 photo-like JPEGs (~450 KB), 4 tars x 100 images, sidecars on.
* ``mem``: one tar of 500 and one of 5,000 images for the memory case, made of the ``imagenet`` members
  (the 5,000-image tar repeats the first 1,000 under new keys), so no image is encoded twice.

Cases that need more work than one pass over a set read a *view*: a folder of symlinks naming every tar
``passes`` times, so N grows without more disk or build time.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import tarfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, Iterator, List, Optional, Tuple

CORPUS_VERSION = 1  # bump when the layout changes


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    tars: int
    images_per_tar: int
    size: Optional[Tuple[int, int]] = None  # None: ImageNet-like sizes
    seed: int = 0
    sidecars: bool = True

    @property
    def images(self) -> int:
        return self.tars * self.images_per_tar

    @property
    def key(self) -> str:
        size = "var" if self.size is None else f"{self.size[0]}x{self.size[1]}"
        return f"{self.name}-{self.tars}x{self.images_per_tar}-{size}-s{self.seed}-sc{int(self.sidecars)}-v{CORPUS_VERSION}"


IMAGENET = CorpusSpec("imagenet", tars=8, images_per_tar=500)
HD = CorpusSpec("hd", tars=4, images_per_tar=100, size=(1920, 1080))
QUICK_IMAGENET = CorpusSpec("imagenet", tars=4, images_per_tar=100)
QUICK_HD = CorpusSpec("hd", tars=2, images_per_tar=20, size=(1920, 1080))
MEM_SMALL, MEM_LARGE = 500, 5000


def default_root() -> str:
    """``bench/results/corpus`` next to this file when writable, else a folder under the system tmp dir."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "corpus")
    try:
        os.makedirs(here, exist_ok=True)
        probe = os.path.join(here, ".probe")
        with open(probe, "w"):
            pass
        os.remove(probe)
        return here
    except OSError:
        import tempfile

        return os.path.join(tempfile.gettempdir(), "beam-tarimg-bench-corpus")


def _done_marker(folder: str) -> str:
    return os.path.join(folder, ".done.json")


def _is_built(folder: str) -> bool:
    return os.path.exists(_done_marker(folder))


def _build_set(spec: CorpusSpec, folder: str) -> Dict:
    """Builds one set in a temporary folder and renames it into place (a killed build leaves no half set)."""
    from beam_tarimg.sample import make_sample_dataset

    start = time.perf_counter()
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    paths = make_sample_dataset(
        tmp, num_tars=spec.tars, images_per_tar=spec.images_per_tar, seed=spec.seed,
        sidecars=spec.sidecars, size=spec.size,
    )
    info = {
        "spec": asdict(spec),
        "tars": [os.path.basename(p) for p in paths],
        "bytes": sum(os.path.getsize(p) for p in paths),
        "build_s": round(time.perf_counter() - start, 2),
    }
    with open(_done_marker(tmp), "w") as f:
        json.dump(info, f, indent=1)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    return info


def _jpeg_members(tar_path: str) -> Iterator[Tuple[str, bytes]]:
    with tarfile.open(tar_path, "r|") as tf:
        for info in tf:
            if info.isfile() and info.name.lower().endswith((".jpg", ".jpeg")):
                yield info.name, tf.extractfile(info).read()


def _write_member_tar(path: str, members: Iterator[Tuple[str, bytes]]) -> None:
    from beam_tarimg.sample import write_tar

    write_tar(path + ".tmp", members)
    os.replace(path + ".tmp", path)


def _build_mem(source: str, folder: str) -> None:
    """``folder/mem-500.tar`` and ``folder/mem-5000.tar`` from the imagenet set's JPEG members."""
    os.makedirs(folder, exist_ok=True)
    tars = sorted(os.path.join(source, t) for t in os.listdir(source) if t.endswith(".tar"))

    def all_members(limit: int) -> Iterator[Tuple[str, bytes]]:
        n = 0
        while True:
            for round_ in range(1000):
                for tar in tars:
                    for name, data in _jpeg_members(tar):
                        if n == limit:
                            return
                        yield f"r{round_}-{name}", data
                        n += 1

    for count in (MEM_SMALL, MEM_LARGE):
        sub = os.path.join(folder, str(count))
        os.makedirs(sub, exist_ok=True)
        _write_member_tar(os.path.join(sub, f"mem-{count:05d}.tar"), all_members(count))
        with open(_done_marker(sub), "w") as f:
            json.dump({"images_per_tar": count}, f)
    with open(_done_marker(folder), "w") as f:
        json.dump({"source": source, "counts": [MEM_SMALL, MEM_LARGE]}, f)


def ensure_corpus(root: str, specs: List[CorpusSpec], with_mem: bool = True, log=print) -> Dict[str, str]:
    """Builds what is missing (the sets in parallel, one process each) and returns ``{name: folder}``;
    with ``with_mem`` also ``mem-500`` and ``mem-5000`` (folders holding one tar each)."""
    os.makedirs(root, exist_ok=True)
    folders = {s.name: os.path.join(root, s.key) for s in specs}
    missing = [s for s in specs if not _is_built(folders[s.name])]
    if missing:
        start = time.perf_counter()
        log(f"building corpus: {', '.join(s.key for s in missing)} under {root}")
        workers = min(len(missing), os.cpu_count() or 1)
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            futures = {pool.submit(_build_set, s, folders[s.name]): s for s in missing}
            for future in concurrent.futures.as_completed(futures):
                s = futures[future]
                info = future.result()
                log(f"  {s.key}: {s.images} images, {info['bytes'] / 1e6:.1f} MB in {info['build_s']:.0f} s")
        log(f"corpus built in {time.perf_counter() - start:.0f} s")
    if with_mem:
        base = [s for s in specs if s.name == "imagenet"][0]
        mem = os.path.join(root, f"mem-from-{base.key}")
        if not _is_built(mem):
            _build_mem(folders["imagenet"], mem)
        folders["mem-500"] = os.path.join(mem, str(MEM_SMALL))
        folders["mem-5000"] = os.path.join(mem, str(MEM_LARGE))
    return folders


def tar_paths(folder: str) -> List[str]:
    return sorted(os.path.join(folder, t) for t in os.listdir(folder) if t.endswith(".tar"))


def images_per_tar(folder: str) -> int:
    with open(_done_marker(folder)) as f:
        info = json.load(f)
    if "spec" in info:
        return info["spec"]["images_per_tar"]
    return info["images_per_tar"]


def view(folder: str, n: int) -> str:
    """A folder of symlinks naming the tars of ``folder`` in turn, cycling, until they hold ``n`` images
    (``n`` a multiple of the set's images per tar); ``folder`` itself when that is exactly the set."""
    tars = tar_paths(folder)
    per_tar = images_per_tar(folder)
    if n % per_tar:
        raise ValueError(f"n={n} is not a multiple of {per_tar} images per tar in {folder}")
    count = n // per_tar
    if count == len(tars):
        return folder
    out = f"{folder.rstrip(os.sep)}.n{n}"
    if os.path.isdir(out) and len(tar_paths(out)) == count:
        return out
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for i in range(count):
        tar = tars[i % len(tars)]
        os.symlink(os.path.abspath(tar), os.path.join(tmp, f"v{i:04d}-{os.path.basename(tar)}"))
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out


def load_jpegs(folder: str) -> List[bytes]:
    """Every JPEG member of every tar in ``folder``, in order, as bytes (for the in-memory cases)."""
    return [data for tar in tar_paths(folder) for _, data in _jpeg_members(tar)]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.corpus", description="Build the benchmark corpus.")
    ap.add_argument("--root", default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    specs = [QUICK_IMAGENET, QUICK_HD] if args.quick else [IMAGENET, HD]
    print(json.dumps(ensure_corpus(args.root or default_root(), specs), indent=1))
