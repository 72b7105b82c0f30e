"""Beam coders for ImageBatch and EncodedBatch: pixels move as raw bytes plus shapes, not as pickles.

Layout (all integers little-endian): a version byte, the tar path, the image count, then per image its
strings, its metadata as sorted-key JSON (pickle only for metadata that JSON would change), and its payload
(for an ImageObject: its pixels, then its ``encoded`` bytes, if any). Decoded pixel arrays are read-only views of
the encoded bytes (no copy).

An ImageBatch whose images all share one shape and dtype (a fixed-shape resize on decode) is written as one
block instead: that dtype and shape once, then per image only its strings, metadata and ``encoded`` bytes, then
all the pixels one after the other (``ImageBatch.pixels``), aligned to 64 bytes of the payload's start. Its
images decode to consecutive views of that block, so ``ImageBatch.pixels`` stays a view after a coder.
"""

from __future__ import annotations

import json
import pickle
import struct
from typing import Any, Dict, List, Tuple

import numpy as np
from apache_beam import coders

from beam_tarimg.types import EncodedBatch, EncodedImage, ImageBatch, ImageObject

_VERSION = 3  # 2: ImageObject.encoded travels after the pixels; 3: a uniform ImageBatch's pixels as one block
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_META_JSON = 0
_META_PICKLE = 1
_PER_IMAGE_OVERHEAD = 64  # a generous bound on the framing bytes of one image, for estimate_size
_EMPTY_META = bytes((_META_JSON,)) + _U32.pack(2) + b"{}"
_PER_IMAGE, _BLOCK = 0, 1  # how an ImageBatch's pixels are laid out
_BLOCK_ALIGN = 64


def _put_str(parts: List[bytes], s: str) -> None:
    b = s.encode("utf-8", errors="surrogateescape")
    parts.append(_U32.pack(len(b)))
    parts.append(b)


def _put_meta(parts: List[bytes], meta: Dict[str, Any]) -> None:
    if not meta:
        parts.append(_EMPTY_META)
        return
    try:
        text = json.dumps(meta, sort_keys=True, separators=(",", ":"))
        exact = json.loads(text) == meta  # tuples, int keys and the like do not survive JSON
    except (TypeError, ValueError):
        exact = False
    if exact:
        b, kind = text.encode("utf-8"), _META_JSON
    else:
        b, kind = pickle.dumps(meta, protocol=4), _META_PICKLE
    parts.append(bytes((kind,)))
    parts.append(_U32.pack(len(b)))
    parts.append(b)


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, data: bytes):
        self.buf = memoryview(data)
        self.pos = 0

    def u8(self) -> int:
        v = self.buf[self.pos]
        self.pos += 1
        return v

    def u32(self) -> int:
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self) -> int:
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def take(self, n: int) -> memoryview:
        v = self.buf[self.pos : self.pos + n]
        if len(v) != n:
            raise ValueError("truncated beam_tarimg coder payload")
        self.pos += n
        return v

    def str(self) -> str:
        return bytes(self.take(self.u32())).decode("utf-8", errors="surrogateescape")

    def meta(self) -> Dict[str, Any]:
        kind = self.u8()
        raw = bytes(self.take(self.u32()))
        return json.loads(raw) if kind == _META_JSON else pickle.loads(raw)

    def header(self) -> Tuple[str, int]:
        version = self.u8()
        if version != _VERSION:
            raise ValueError(f"unknown beam_tarimg coder version {version}")
        return self.str(), self.u32()


def _put_array_header(parts: List[bytes], a: np.ndarray) -> None:
    _put_str(parts, a.dtype.str)
    parts.append(bytes((a.ndim,)))
    parts.extend(_U64.pack(d) for d in a.shape)


def _put_encoded(parts: List[bytes], encoded) -> None:
    if encoded is None:
        parts.append(_U64.pack(0))
    else:
        parts.append(_U64.pack(len(encoded) + 1))
        parts.append(encoded)


def _take_encoded(r: _Reader):
    n_encoded = r.u64()
    return bytes(r.take(n_encoded - 1)) if n_encoded else None


class ImageBatchCoder(coders.Coder):
    """Deterministic coder for ``ImageBatch``: raw pixel bytes plus dtype and shape per image, then the image's
    ``encoded`` bytes (length + 1, 0 meaning None); for a batch of one shape and dtype, one block of pixels
    (see the module docstring)."""

    def encode(self, batch: ImageBatch) -> bytes:
        parts: List[bytes] = [bytes((_VERSION,))]
        _put_str(parts, batch.tar_path)
        parts.append(_U32.pack(len(batch.images)))
        arrays = [np.ascontiguousarray(image.image_data) for image in batch.images]
        uniform = len(arrays) > 1 and all(a.shape == arrays[0].shape and a.dtype == arrays[0].dtype for a in arrays)
        parts.append(bytes((_BLOCK if uniform else _PER_IMAGE,)))
        if uniform:
            _put_array_header(parts, arrays[0])
        for image, a in zip(batch.images, arrays):
            _put_str(parts, image.image_path)
            _put_str(parts, image.image_id)
            _put_meta(parts, image.metadata)
            if not uniform:
                _put_array_header(parts, a)
                parts.append(_U64.pack(a.nbytes))
                parts.append(a.data if a.nbytes else b"")
            _put_encoded(parts, image.encoded)
        if uniform:  # the pixels one after the other: one block, however they lay in memory
            head = sum(len(p) for p in parts) + _U64.size + 1
            pad = -head % _BLOCK_ALIGN
            parts.append(_U64.pack(sum(a.nbytes for a in arrays)))
            parts.append(bytes((pad,)) + bytes(pad))
            parts.extend(a.data for a in arrays if a.nbytes)
        return b"".join(parts)

    def decode(self, encoded: bytes) -> ImageBatch:
        r = _Reader(encoded)
        tar_path, n = r.header()
        layout = r.u8()
        if layout == _BLOCK:
            dtype = np.dtype(r.str())
            shape = tuple(r.u64() for _ in range(r.u8()))
            heads = [(r.str(), r.str(), r.meta(), _take_encoded(r)) for _ in range(n)]
            size = r.u64()
            r.take(r.u8())  # the alignment padding
            block = np.frombuffer(r.take(size), dtype=dtype).reshape((n,) + shape)
            return ImageBatch(tar_path, [ImageObject(p, i, block[k], m, e) for k, (p, i, m, e) in enumerate(heads)])
        images = []
        for _ in range(n):
            path, image_id, meta = r.str(), r.str(), r.meta()
            dtype = np.dtype(r.str())
            shape = tuple(r.u64() for _ in range(r.u8()))
            data = np.frombuffer(r.take(r.u64()), dtype=dtype).reshape(shape)
            images.append(ImageObject(path, image_id, data, meta, _take_encoded(r)))
        return ImageBatch(tar_path, images)

    def is_deterministic(self) -> bool:
        return True

    def estimate_size(self, batch: ImageBatch) -> int:
        # Beam samples element sizes; the default would encode the whole batch just to measure it.
        return 16 + len(batch.tar_path) + sum(
            image.image_data.nbytes + len(image.encoded or b"") + len(image.image_path) + len(image.image_id)
            + _PER_IMAGE_OVERHEAD
            for image in batch.images
        )

    def to_type_hint(self):
        return ImageBatch

    def __eq__(self, other):
        return type(self) is type(other)

    def __hash__(self):
        return hash(type(self))


class EncodedBatchCoder(coders.Coder):
    """Deterministic coder for ``EncodedBatch``: the JPEG bytes as they came out of the tar."""

    def encode(self, batch: EncodedBatch) -> bytes:
        parts: List[bytes] = [bytes((_VERSION,))]
        _put_str(parts, batch.tar_path)
        parts.append(_U32.pack(len(batch.images)))
        for image in batch.images:
            _put_str(parts, image.member)
            _put_str(parts, image.image_id)
            _put_meta(parts, image.metadata)
            parts.append(_U64.pack(len(image.data)))
            parts.append(image.data)
        return b"".join(parts)

    def decode(self, encoded: bytes) -> EncodedBatch:
        r = _Reader(encoded)
        tar_path, n = r.header()
        images = []
        for _ in range(n):
            member, image_id, meta = r.str(), r.str(), r.meta()
            images.append(EncodedImage(member, image_id, bytes(r.take(r.u64())), meta))
        return EncodedBatch(tar_path, images)

    def is_deterministic(self) -> bool:
        return True

    def estimate_size(self, batch: EncodedBatch) -> int:
        return 16 + len(batch.tar_path) + sum(
            len(image.data) + len(image.member) + len(image.image_id) + _PER_IMAGE_OVERHEAD
            for image in batch.images
        )

    def to_type_hint(self):
        return EncodedBatch

    def __eq__(self, other):
        return type(self) is type(other)

    def __hash__(self):
        return hash(type(self))


coders.registry.register_coder(ImageBatch, ImageBatchCoder)
coders.registry.register_coder(EncodedBatch, EncodedBatchCoder)
