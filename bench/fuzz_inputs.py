"""Hostile *inputs* for ``bench.fuzz`` (``make fuzz``): folder entries and compressed tars, not mutated bytes.

Each kind below is written into the job's input folder by ``write_inputs`` and comes back as ``bench.fuzz``
``TarPlan``s, so that the harness's accounting (every JPEG member exactly once, as a row or a failure) covers
them; entries that are no tar at all (a FIFO, a directory, a dangling link, ...) must each come out as exactly
one ``open`` failure naming them (``check_entries``), so an entry skipped without a word counts as lost.

Kinds (the issue's list, "Nothing lost, nothing wrong, nothing endless"):

- ``glob-names``: valid tars whose file names hold ``\\``, ``[``, ``]``, ``*``, ``?``: every image read.
- ``not-regular``: ``dir.tar`` (a directory), ``fifo.tar`` (a FIFO: opening it for reading blocks), ``sock.tar``
  (a socket), ``gone.tar`` (a dangling symbolic link), ``zero.tar`` (a symbolic link to /dev/zero, endless):
  one ``open`` failure each, decided without blocking; ``link.tar``, a link to a valid tar elsewhere, is read.
- ``multi-member``: one tar split into 2-3 gzip members (as ``pigz``/``cat a.gz b.gz`` write), and the same for
  bzip2 streams (``pbzip2``), xz streams and zstd frames: every image read.
- ``cat-gzip``: ``cat a.tar.gz b.tar.gz`` of two whole tars: the first's images, then the one ``read`` failure
  for the data after its end-of-archive blocks (as for ``cat a.tar b.tar``).
- ``trailing-zeros``: a ~KB bzip2 tar, its end-of-archive blocks, then GiBs of compressed zeros: the image is
  read and the job ends at once (only a few blocks past the end are looked at).
- ``bomb``: gzip, bzip2 and xz tars whose second member decompresses to GiBs of zeros, a JPEG after it: the
  first JPEG is read, then one ``read`` failure (over ``max_expansion``) in bounded time and memory.

``python -m bench.fuzz_inputs --measure`` times each kind alone through ``pipelines.tar_to_parquet`` (the
figures in the README's "Bounded resources").
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import socket
import sys
import tarfile
import types
import zlib
from typing import Dict, List, NamedTuple, Optional, Tuple

from bench import mutate as M

GLOB_NAMES = ("back\\slash.tar", "br[a]cket.tar", "st*r.tar", "q?mark.tar", "[!x].tar")


class Entry(NamedTuple):
    """A folder entry that is no tar to read: it must come out as one ``open`` failure naming it."""

    file_name: str
    kind: str
    stage: str


def _jpeg(seed: int) -> bytes:
    from beam_tarimg.sample import encode_jpeg, photo_like_image
    import numpy as np

    return encode_jpeg(photo_like_image(np.random.default_rng(seed), 40, 32))


def _members(prefix: str, n: int, seed: int) -> List[Tuple[str, bytes]]:
    return [(f"{prefix}{i:03d}.jpg", _jpeg(seed + i)) for i in range(n)]


def _expected(data: bytes, jpegs: Dict[str, bytes], base: int = 0):
    return tuple(M.ExpectedMember((m.name,), base + m.offset, True, False, jpegs[m.name])
                 for m in M.lay_out(data, {}) if m.name in jpegs)


def _plan(folder: str, name: str, kind: str, payload: bytes, members, damage=None):
    """Writes the tar ``name``; its plan carries the name as outputs spell it (``\\`` for a backslash)."""
    from beam_tarimg.tario import escape_member_name
    from bench.fuzz import TarPlan

    with open(os.path.join(folder, name), "wb") as f:
        f.write(payload)
    return TarPlan(escape_member_name(name), kind, tuple(members), damage, {})


# ------------------------------------------------------------------------------------------- compressors


def _split(data: bytes, parts: int) -> List[bytes]:
    """``data`` cut into ``parts`` pieces at points that are not block boundaries (mid-member, mid-header)."""
    cuts = [len(data) * k // parts + 77 for k in range(1, parts)]
    bounds = [0] + cuts + [len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def gzip_members(data: bytes, parts: int) -> bytes:
    return b"".join(gzip.compress(p, mtime=0) for p in _split(data, parts))


def bzip2_streams(data: bytes, parts: int) -> bytes:
    return b"".join(bz2.compress(p) for p in _split(data, parts))


def xz_streams(data: bytes, parts: int) -> bytes:
    return b"".join(lzma.compress(p) for p in _split(data, parts))


def zstd_frames(data: bytes, parts: int) -> Optional[bytes]:
    try:
        import zstandard
    except ImportError:
        return None
    return b"".join(zstandard.ZstdCompressor().compress(p) for p in _split(data, parts))


_COMPRESSORS = {"gz": lambda: zlib.compressobj(6, zlib.DEFLATED, 31), "bz2": lambda: bz2.BZ2Compressor(9),
                "xz": lambda: lzma.LZMACompressor()}
_ZERO_PIECE = {"gz": 64 << 20, "bz2": 64 << 20, "xz": 8 << 20}  # xz compresses zeros slowly
_zero_streams: Dict[str, bytes] = {}


def _zero_stream(fmt: str) -> bytes:
    """One whole stream (gzip member, bzip2 / xz stream) of ``_ZERO_PIECE[fmt]`` zeros, made once."""
    if fmt not in _zero_streams:
        comp = _COMPRESSORS[fmt]()
        _zero_streams[fmt] = comp.compress(bytes(_ZERO_PIECE[fmt])) + comp.flush()
    return _zero_streams[fmt]


def compressed_zeros(fmt: str, head: bytes, zeros: int, tail: bytes = b"", single_stream: bool = False) -> bytes:
    """``head``, then ``zeros`` zero bytes, then ``tail``, compressed with ``fmt`` (gz, bz2, xz).

    ``single_stream``: as one stream, written in 64 MiB pieces (slow: ~10 s per GiB for bz2 here). Otherwise the
    zeros past the first piece come as copies of one ready stream of zeros (a multi-member file, which
    gzip, bzip2 and xz tools read as one): GiBs in well under a second.
    """
    comp = _COMPRESSORS[fmt]()
    piece_size = _ZERO_PIECE[fmt]
    first = zeros if single_stream else min(zeros, piece_size)
    out = [comp.compress(head)]
    chunk = bytes(min(first, 64 << 20))
    left = first
    while left > 0:
        piece = chunk if left >= len(chunk) else chunk[:left]
        out.append(comp.compress(piece))
        left -= len(piece)
    rest = zeros - first
    if rest:
        out.append(comp.flush())
        out.append(_zero_stream(fmt) * (rest // piece_size))
        comp = _COMPRESSORS[fmt]()
        out.append(comp.compress(bytes(rest % piece_size)))
    out.append(comp.compress(tail))
    out.append(comp.flush())
    return b"".join(out)


# ----------------------------------------------------------------------------------------------- kinds


def write_glob_names(folder: str, seed: int) -> list:
    plans = []
    for i, name in enumerate(GLOB_NAMES):
        members = _members("g", 3, seed + 10 * i)
        data = M.build_tar(members)
        plans.append(_plan(folder, name, "glob-names", data, _expected(data, dict(members))))
    return plans


def _make_entry(folder: str, name: str) -> bool:
    """Makes the folder entry ``name`` (one of ``NOT_REGULAR``); False where this system cannot."""
    path = os.path.join(folder, name)
    if name == "dir.tar":
        os.mkdir(path)
        with open(os.path.join(path, "inside.tar"), "wb") as f:  # never matched: not in the folder itself
            f.write(M.build_tar(_members("in", 1, 0)))
    elif name == "fifo.tar":
        os.mkfifo(path)
    elif name == "sock.tar":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)  # the socket file stays after the socket is closed
        except OSError:  # a path too long for AF_UNIX
            return False
        finally:
            sock.close()
    elif name == "gone.tar":
        os.symlink(os.path.join(folder, "no-such-file.tar.gone"), path)
    elif name == "zero.tar":
        os.symlink("/dev/zero", path)
    return True


NOT_REGULAR = ("dir.tar", "fifo.tar", "sock.tar", "gone.tar", "zero.tar")


def write_not_regular(folder: str, seed: int, outside: str, only=NOT_REGULAR) -> Tuple[list, List[Entry]]:
    from bench.fuzz import TarPlan

    entries = [Entry(name, "not-regular", "open") for name in only if _make_entry(folder, name)]
    os.makedirs(outside, exist_ok=True)
    members = _members("l", 2, seed + 100)
    data = M.build_tar(members)
    with open(os.path.join(outside, "target.tar"), "wb") as f:
        f.write(data)
    os.symlink(os.path.join(outside, "target.tar"), os.path.join(folder, "link.tar"))
    # The entries hold no member; as plans with a damage point their one tar-level failure is expected.
    plans = [TarPlan(e.file_name, e.kind, (), 0, {}) for e in entries]
    return plans + [TarPlan("link.tar", "not-regular", _expected(data, dict(members)), None, {})], entries


def write_multi_member(folder: str, seed: int) -> list:
    members = _members("m", 6, seed + 200)
    data = M.build_tar(members)
    expected = _expected(data, dict(members))
    plans = [
        _plan(folder, "gzip2.tar", "multi-member", gzip_members(data, 2), expected),
        _plan(folder, "gzip3.tar", "multi-member", gzip_members(data, 3), expected),
        _plan(folder, "bzip2.tar", "multi-member", bzip2_streams(data, 2), expected),
        _plan(folder, "xz2.tar", "multi-member", xz_streams(data, 2), expected),
    ]
    zst = zstd_frames(data, 2)
    if zst is not None:
        plans.append(_plan(folder, "zstd2.tar", "multi-member", zst, expected))
    return plans


def write_cat_gzip(folder: str, seed: int) -> list:
    first, second = _members("a", 2, seed + 300), _members("b", 2, seed + 310)
    a, b = M.build_tar(first), M.build_tar(second)
    expected = _expected(a, dict(first)) + _expected(b, dict(second), base=len(a))
    payload = gzip.compress(a, mtime=0) + gzip.compress(b, mtime=0)
    return [_plan(folder, "cat-gzip.tar", "cat-gzip", payload, expected, damage=len(a))]


def trailing_zeros_tar(seed: int, zeros: int, single_stream: bool = False) -> Tuple[bytes, bytes, Dict[str, bytes]]:
    """(bzip2 bytes, the tar, its JPEGs): one JPEG, the end-of-archive blocks, ``zeros`` more zero bytes."""
    members = _members("z", 1, seed + 400)
    data = M.build_tar(members)
    return compressed_zeros("bz2", data, zeros, single_stream=single_stream), data, dict(members)


def write_trailing_zeros(folder: str, seed: int, zeros: int) -> list:
    payload, data, jpegs = trailing_zeros_tar(seed, zeros)
    return [_plan(folder, "trailing-zeros.tar", "trailing-zeros", payload, _expected(data, jpegs))]


def bomb_tar(fmt: str, seed: int, zeros: int, single_stream: bool = False) -> Tuple[bytes, tuple, int]:
    """(compressed bytes, expected members, damage): a JPEG, ``pad.bin`` of ``zeros`` zero bytes, a JPEG."""
    first, last = _members("b0", 1, seed + 500)[0], _members("b1", 1, seed + 501)[0]
    info = tarfile.TarInfo("pad.bin")
    info.size = zeros
    head = M.build_tar([first])
    head = head[: _end_of_members(head)]
    pad_header = info.tobuf(tarfile.PAX_FORMAT)
    tail = M.build_tar([last])
    tail_offset = len(head) + len(pad_header) + zeros + (-zeros % 512)
    payload = compressed_zeros(fmt, head + pad_header, zeros, bytes(-zeros % 512) + tail, single_stream)
    expected = (M.ExpectedMember((first[0],), 0, True, False, first[1]),
                M.ExpectedMember((last[0],), tail_offset, True, False, last[1]))
    return payload, expected, len(head)


def _end_of_members(raw: bytes) -> int:
    end = len(raw)
    while end >= 512 and raw[end - 512 : end] == bytes(512):
        end -= 512
    return end


def write_bombs(folder: str, seed: int, zeros: int) -> list:
    plans = []
    for fmt in ("gz", "bz2", "xz"):
        payload, expected, damage = bomb_tar(fmt, seed, zeros)
        plans.append(_plan(folder, f"bomb-{fmt}.tar", "bomb", payload, expected, damage=damage))
    return plans


def write_inputs(folder: str, seed: int, zeros: int = 4 << 30) -> Tuple[list, List[Entry]]:
    """Every kind above in ``folder`` (the job's input folder): (TarPlans, Entries). ``zeros``: the trailing
    zeros and bomb sizes (decompressed)."""
    plans = write_glob_names(folder, seed)
    linked, entries = write_not_regular(folder, seed, os.path.join(os.path.dirname(folder), "outside"))
    plans += linked
    plans += write_multi_member(folder, seed)
    plans += write_cat_gzip(folder, seed)
    plans += write_trailing_zeros(folder, seed, zeros)
    plans += write_bombs(folder, seed, zeros)
    return plans, entries


def check_entries(entries: List[Entry], failures) -> Tuple[int, List[str]]:
    """(entries not reported exactly once as their expected failure, examples)."""
    by_tar: Dict[str, list] = {}
    for rec in failures:
        by_tar.setdefault(os.path.basename(str(rec.get("tar", "")).rstrip("/")), []).append(rec)
    lost, examples = 0, []
    for e in entries:
        got = [r for r in by_tar.get(e.file_name, []) if r.get("member") is None and r.get("stage") == e.stage]
        if len(got) != 1:
            lost += 1
            examples.append(f"{e.file_name} ({e.kind}): {len(got)} {e.stage} failures, want 1")
    return lost, examples


def run_inputs_job(work: str, args, log) -> Dict:
    """The job over every kind above (``bench.fuzz.run_job``), with the entries' failures checked too: an entry
    without its one ``open`` failure counts as lost."""
    from bench import fuzz

    in_dir = os.path.join(work, "job-inputs", "in")
    os.makedirs(in_dir, exist_ok=True)
    plans, entries = write_inputs(in_dir, args.seed)
    out_dir = os.path.join(work, "job-inputs", "out")
    job = fuzz.run_job("inputs", plans, in_dir, out_dir, args, log)
    _, failures, _ = fuzz.read_outputs(out_dir, {})
    lost, examples = check_entries(entries, failures)
    acc = job["accounting"]
    job["entries"] = len(entries)
    if lost:
        acc["lost"] += lost
        acc["lost_by_kind"]["not-regular"] = acc["lost_by_kind"].get("not-regular", 0) + lost
        acc["examples"] += examples
        log(f"  job inputs: {lost} folder entries without their one open failure: {examples}")
    return job


# ------------------------------------------------------------------------------------------ measuring


def _measure(kind: str, work: str, timeout: float, seed: int = 0) -> Dict:
    """One kind alone (plus one good tar) through ``pipelines.tar_to_parquet`` on the FnApiRunner."""
    from bench import fuzz

    in_dir = os.path.join(work, kind, "in")
    os.makedirs(in_dir)
    good = _members("ok", 2, seed + 900)
    data = M.build_tar(good)
    plans = [_plan(in_dir, "good.tar", "good", data, _expected(data, dict(good)))]
    entries: List[Entry] = []
    if kind == "glob-names":
        plans += write_glob_names(in_dir, seed)
    elif kind.startswith("not-regular"):
        linked, entries = write_not_regular(in_dir, seed, os.path.join(work, kind, "outside"),
                                            only=(kind.split(":")[1],))
        plans += linked
    elif kind == "multi-member":
        plans += write_multi_member(in_dir, seed)
    elif kind.startswith("trailing-zeros"):
        payload, data, jpegs = trailing_zeros_tar(seed, int(kind.split(":")[1]) << 20, single_stream=True)
        plans.append(_plan(in_dir, "trailing-zeros.tar", "trailing-zeros", payload, _expected(data, jpegs)))
    elif kind.startswith("bomb"):
        fmt, mib = kind.split(":")[1:]
        payload, expected, damage = bomb_tar(fmt, seed, int(mib) << 20, single_stream=True)
        plans.append(_plan(in_dir, f"bomb-{fmt}.tar", "bomb", payload, expected, damage=damage))

    args = types.SimpleNamespace(batch_size=64, num_threads=2, runner="FnApiRunner", job_timeout=timeout)
    out_dir = os.path.join(work, kind, "out")
    job = fuzz.run_job(kind, plans, in_dir, out_dir, args, lambda s: None)
    _, failures, _ = fuzz.read_outputs(out_dir, {})
    lost, examples = check_entries(entries, failures)
    acc = job["accounting"]
    return {"kind": kind, "exit": job["exit_code"], "hung": job["hung"], "seconds": job["seconds"],
            "peak_rss_mb": job["peak_rss_mb"], "tree_pss_mb": job["tree_peak_mb"], "rows": acc["rows"],
            "lost": acc["lost"] + lost, "tar_failures": job["failures_by_stage"],
            "examples": (acc["examples"] + examples)[:4],
            "input_bytes": sum(os.path.getsize(os.path.join(in_dir, n)) for n in os.listdir(in_dir)
                               if os.path.isfile(os.path.join(in_dir, n)) and not os.path.islink(
                                   os.path.join(in_dir, n)))}


def main(argv=None) -> int:
    import argparse
    import json
    import tempfile

    p = argparse.ArgumentParser(prog="python -m bench.fuzz_inputs", description=__doc__.split("\n\n")[0])
    p.add_argument("--measure", nargs="*", default=None, metavar="KIND",
                   help="time each kind alone through the job (default: all; sizes in MiB, one stream each)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a job counts as hung (120)")
    args = p.parse_args(argv)
    kinds = args.measure or ["glob-names", "not-regular:dir.tar", "not-regular:fifo.tar", "not-regular:sock.tar",
                             "not-regular:gone.tar", "not-regular:zero.tar", "multi-member",
                             "trailing-zeros:4096", "bomb:gz:4096", "bomb:bz2:4096", "bomb:xz:1024"]
    with tempfile.TemporaryDirectory(prefix="beam-tarimg-inputs-") as work:
        for kind in kinds:
            print(json.dumps(_measure(kind, work, args.timeout)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
