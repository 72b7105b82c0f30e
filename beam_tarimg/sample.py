"""Synthetic, photo-like sample data: JPEGs and webdataset-style tar shards.

Used by the demo, the tests and the benchmarks. Needs only numpy and Pillow
(Pillow is imported inside the functions that use it). Everything is
deterministic for a given seed.

Run ``python -m beam_tarimg.sample --out DIR`` to write a small dataset.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

__all__ = [
    "photo_like_image",
    "encode_jpeg",
    "imagenet_like_jpeg",
    "write_tar",
    "make_sample_dataset",
    "main",
]

_SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}
_EXIF_ORIENTATION_TAG = 0x0112

_ADJECTIVES = ("blurry", "bright", "dark", "colourful", "quiet", "warm", "cold", "soft")
_THINGS = ("shapes", "landscape", "still life", "street", "garden", "room", "sky", "table")


def _smooth_noise(
    rng: np.random.Generator, width: int, height: int, grid_w: int, grid_h: int, channels: int
) -> np.ndarray:
    """Standard-normal noise on a grid_w x grid_h lattice, bicubic-upsampled to HxWxC float32."""
    from PIL import Image

    small = rng.standard_normal((grid_h, grid_w, channels), dtype=np.float32)
    out = np.empty((height, width, channels), dtype=np.float32)
    for c in range(channels):
        layer = Image.fromarray(np.ascontiguousarray(small[:, :, c]), "F")
        out[:, :, c] = np.asarray(layer.resize((width, height), Image.BICUBIC))
    return out


def photo_like_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Return a smooth, textured, photo-like RGB image as a uint8 HxWx3 array.

    Large colour gradients and soft-edged ellipses/rectangles are drawn at half
    resolution with a mid-scale texture, upsampled bicubically, then mild
    per-pixel grain is added. JPEG at quality 75-95 gives ~0.15-0.25 bytes/pixel.
    """
    from PIL import Image, ImageDraw, ImageFilter

    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    hw, hh = (width + 1) // 2, (height + 1) // 2

    # Low-frequency colour field: a base colour, luminance waves with a tint,
    # and independent slow colour drift.
    base = rng.uniform(60.0, 190.0, 3).astype(np.float32)
    tint = rng.uniform(-1.0, 1.0, 3).astype(np.float32)
    lum = _smooth_noise(rng, hw, hh, 4, 4, 1)
    canvas = base + lum * (35.0 + 15.0 * tint) + _smooth_noise(rng, hw, hh, 3, 3, 3) * 30.0
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")

    # Solid shapes, softened by a small blur (and later by the 2x upsampling).
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        cx, cy = rng.uniform(0, hw), rng.uniform(0, hh)
        rx, ry = rng.uniform(0.04, 0.25) * hw, rng.uniform(0.04, 0.25) * hh
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        colour = tuple(int(v) for v in rng.integers(20, 236, 3))
        if rng.random() < 0.6:
            draw.ellipse(box, fill=colour)
        else:
            draw.rectangle(box, fill=colour)
    img = img.filter(ImageFilter.BoxBlur(float(rng.uniform(0.5, 2.0))))

    # Soft lighting plus mid-scale texture (~2-6 px features), at half resolution.
    mid = float(rng.uniform(4.0, 7.0))
    canvas = np.asarray(img, dtype=np.float32)
    canvas *= 1.0 + 0.25 * _smooth_noise(rng, hw, hh, 5, 5, 1)
    canvas += _smooth_noise(rng, hw, hh, hw // 3 + 1, hh // 3 + 1, 1) * (1.5 * mid)
    canvas += rng.standard_normal((hh, hw, 1), dtype=np.float32) * mid
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    img = img.resize((width, height), Image.BICUBIC)

    # Fine per-pixel grain.
    grain = int(rng.integers(3, 6))
    out = rng.integers(-grain, grain + 1, (height, width, 3), dtype=np.int16)
    out += np.asarray(img, dtype=np.uint8)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def encode_jpeg(
    pixels: np.ndarray,
    quality: int = 90,
    subsampling: str = "4:2:0",
    progressive: bool = False,
    grayscale: bool = False,
    exif_orientation: Optional[int] = None,
) -> bytes:
    """Encode a uint8 HxWx3 (or HxW) array as JPEG bytes with Pillow.

    ``grayscale`` (or a 2-D input) gives a 1-channel JPEG. ``exif_orientation``
    (1..8) writes an EXIF Orientation tag; the pixels are not rotated.
    """
    from PIL import Image

    if subsampling not in _SUBSAMPLING:
        raise ValueError(f"subsampling must be one of {sorted(_SUBSAMPLING)}, got {subsampling!r}")
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8:
        raise ValueError(f"pixels must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        img = Image.fromarray(arr, "L")
    elif arr.ndim == 3 and arr.shape[2] == 3:
        img = Image.fromarray(arr, "RGB")
        if grayscale:
            img = img.convert("L")
    else:
        raise ValueError(f"pixels must be HxW or HxWx3, got shape {arr.shape}")

    kwargs = {"quality": int(quality), "progressive": bool(progressive)}
    if img.mode == "RGB":
        kwargs["subsampling"] = _SUBSAMPLING[subsampling]
    if exif_orientation is not None:
        if not 1 <= int(exif_orientation) <= 8:
            raise ValueError(f"exif_orientation must be in 1..8, got {exif_orientation}")
        exif = Image.Exif()
        exif[_EXIF_ORIENTATION_TAG] = int(exif_orientation)
        kwargs["exif"] = exif.tobytes()
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


def _imagenet_like(rng: np.random.Generator, index: int) -> tuple[bytes, int, int]:
    """Like imagenet_like_jpeg but also returns (width, height)."""
    width = int(rng.integers(300, 561))
    height = int(rng.integers(250, 481))
    quality = int(rng.integers(75, 96))
    slot = index % 20
    subsampling = "4:4:4" if slot in (1, 5, 11) else "4:2:0"
    data = encode_jpeg(
        photo_like_image(rng, width, height),
        quality=quality,
        subsampling=subsampling,
        progressive=slot in (3, 13),
        grayscale=slot == 7,
    )
    return data, width, height


def imagenet_like_jpeg(rng: np.random.Generator, index: int) -> bytes:
    """Return one ImageNet-like JPEG (~300-560 x 250-480 px, quality 75-95).

    Size, quality and content come from ``rng``; the encoding variant comes
    from ``index % 20`` so every 20 consecutive indices hold the same mix:
    70% baseline 4:2:0, 15% 4:4:4, 10% progressive 4:2:0, 5% grayscale.
    """
    return _imagenet_like(rng, index)[0]


def write_tar(path: str, members: Iterable[tuple[str, bytes]]) -> None:
    """Write ``(name, data)`` pairs, in order, to an uncompressed tar at ``path``.

    Members are consumed one at a time. Each gets mtime 0, mode 0o644 and
    uid/gid 0, so equal input gives byte-identical output.
    """
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))


def _sample_members(
    first: int, count: int, seed: int, sidecars: bool, size: Optional[tuple[int, int]]
) -> Iterator[tuple[str, bytes]]:
    """Yield the tar members of samples first..first+count-1, each sample jpg, json, txt."""
    for index in range(first, first + count):
        rng = np.random.default_rng([seed, index])
        key = f"{index:09d}"
        if size is None:
            data, width, height = _imagenet_like(rng, index)
        else:
            width, height = size
            data = encode_jpeg(photo_like_image(rng, width, height), quality=90)
        yield f"{key}.jpg", data
        if sidecars:
            meta = {"key": key, "source": "sample", "width": width, "height": height}
            yield f"{key}.json", json.dumps(meta, sort_keys=True).encode("utf-8")
            caption = f"a {rng.choice(_ADJECTIVES)} {rng.choice(_THINGS)}, sample {key}"
            yield f"{key}.txt", caption.encode("utf-8")


def make_sample_dataset(
    out_dir: str,
    num_tars: int = 4,
    images_per_tar: int = 64,
    seed: int = 0,
    sidecars: bool = True,
    size: Optional[tuple[int, int]] = None,
) -> list[str]:
    """Write webdataset-style shards ``out_dir/00000.tar``, ``00001.tar``, ...

    Sample ``i`` (counted across all shards) has key ``f"{i:09d}"`` and members
    ``{key}.jpg`` and, with ``sidecars``, ``{key}.json`` and ``{key}.txt``,
    adjacent in that order. ``size=(width, height)`` fixes every image's size
    (quality 90, 4:2:0); otherwise images are ImageNet-like. Each image depends
    only on ``(seed, i)``. Returns the tar paths, sorted.
    """
    if num_tars < 0 or images_per_tar < 0:
        raise ValueError("num_tars and images_per_tar must be >= 0")
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for shard in range(num_tars):
        path = os.path.join(out_dir, f"{shard:05d}.tar")
        write_tar(path, _sample_members(shard * images_per_tar, images_per_tar, seed, sidecars, size))
        paths.append(path)
    return sorted(paths)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1920x1080, got {text!r}") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return w, h


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; prints a one-line summary."""
    parser = argparse.ArgumentParser(
        prog="python -m beam_tarimg.sample",
        description="Write synthetic webdataset-style JPEG tar shards.",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--tars", type=int, default=4, help="number of tar shards (default 4)")
    # Underscores, as the jobs' flags (--batch_size); the hyphenated spellings of earlier versions still work.
    parser.add_argument("--images_per_tar", "--images-per-tar", type=int, default=64,
                        help="images per shard (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=_parse_size, default=None, help="fixed image size WxH, e.g. 1920x1080")
    parser.add_argument("--no_sidecars", "--no-sidecars", action="store_true", help="write only .jpg members")
    args = parser.parse_args(argv)

    paths = make_sample_dataset(
        args.out,
        num_tars=args.tars,
        images_per_tar=args.images_per_tar,
        seed=args.seed,
        sidecars=not args.no_sidecars,
        size=args.size,
    )
    total_mb = sum(os.path.getsize(p) for p in paths) / 1e6
    print(f"wrote {len(paths)} tars, {len(paths) * args.images_per_tar} images, "
          f"{total_mb:.1f} MB to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
