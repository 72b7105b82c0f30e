"""Resize on decode: what ``Resize`` asks for, its geometry, and its Pillow/numpy form for the fallback.

Beam-free and numpy-only at import (Pillow is imported where an image is resized by it). The decode applies a
``Resize`` in two places, to the same geometry:

* DALI (``beam_tarimg.dali.DaliDecoder``): ``fn.resize`` to the target size, ``fn.slice`` for the crop or the
  letterbox padding, ``fn.crop_mirror_normalize`` (or ``fn.transpose``) for dtype, mean/std and layout, all on
  the decode device (the GPU's ``"mixed"`` decoder output, before the copy to host; the CPU in the decoder
  process). DALI decodes the stored frame; the geometry is computed here on the EXIF-oriented image and mapped
  back onto the stored frame (``stored_geometry``), and the small output is oriented afterwards in numpy
  (``dali.orient_output``).
* Pillow (``apply_pillow``), for images DALI rejects or whose decoded frame differs from the header: Pillow's
  decode, ``ImageOps.exif_transpose``, ``Image.resize`` with the matching filter (``BILINEAR``/``BICUBIC``,
  ``reducing_gap=None``; without antialiasing a numpy resampler of DALI's kind), then the same crop/pad,
  normalization and layout in numpy.

Sizes: every target size is computed here, in integers, and given to DALI explicitly, so both paths give the
same shape: ``"shorter"`` scales the shorter side to ``size`` and the longer one to
``int(size * long / short)`` (torchvision's ``Resize(int)``); the centre crop starts at
``round((resized - crop) / 2)`` (torchvision's ``CenterCrop``); ``"letterbox"`` scales by ``min(H/h, W/w)``,
rounds each side (at least 1) and pads centred, the extra pixel of an odd margin at the bottom/right.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional, Tuple, Union

import numpy as np

MODES = ("shorter", "letterbox", "stretch")
INTERPOLATIONS = ("linear", "cubic")
DTYPES = ("uint8", "float32")
LAYOUTS = ("HWC", "CHW")
MAX_SIDE = 1 << 15  # a sanity bound on any requested side (DALI and Pillow would try to allocate it)

# EXIF orientation -> (stored rows come from oriented columns, stored rows flipped, stored columns flipped):
# how a window on the oriented image (what Pillow's exif_transpose gives) lies on the stored frame.
_WINDOW_MAP = {
    1: (False, False, False),
    2: (False, False, True),
    3: (False, True, True),
    4: (False, True, False),
    5: (True, False, False),
    6: (True, True, False),
    7: (True, True, True),
    8: (True, False, True),
}


def _side(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MAX_SIDE:
        raise ValueError(f"{name} must be an integer in [1, {MAX_SIDE}], got {value!r}")
    return int(value)


def _pair(name: str, value) -> Tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        side = _side(name, value)
        return side, side
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return _side(f"{name}[0] (height)", value[0]), _side(f"{name}[1] (width)", value[1])
    raise ValueError(f"{name} must be an int or an (H, W) pair of ints, got {value!r}")


def _channels(name: str, value, default: float) -> Tuple[float, float, float]:
    if value is None:
        return (default,) * 3
    values = [value] * 3 if isinstance(value, numbers.Real) and not isinstance(value, bool) else value
    try:
        out = tuple(float(v) for v in values if not isinstance(v, (bool, str, bytes)))
        ok = len(out) == 3 == len(values) and all(math.isfinite(v) for v in out)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a finite number or 3 finite numbers (R, G, B), got {value!r}")
    return out  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Resize:
    """A resize (and crop, pad, normalize, layout) applied to every image as it is decoded.

    Args:
      size: ``mode="shorter"``: an int S, the shorter side becomes S, the aspect ratio kept (shapes vary, like
        torchvision's ``Resize(S)``). ``"letterbox"`` and ``"stretch"``: ``(H, W)`` (an int means square).
      crop: ``"shorter"`` only: ``(H, W)`` or an int; a centre crop of the resized image (each side at most
        ``size``): torchvision's ``Resize(S)`` + ``CenterCrop``, the classifier/CLIP input, a fixed shape.
      mode: ``"shorter"``, ``"letterbox"`` (fit inside HxW, aspect kept, the rest padded with ``pad_value``,
        centred) or ``"stretch"`` (plain resize to HxW).
      interpolation: ``"linear"`` or ``"cubic"`` (DALI's ``INTERP_LINEAR``/``INTERP_CUBIC``; Pillow's
        ``BILINEAR``/``BICUBIC`` in the fallback).
      antialias: low-pass filter when shrinking (default True, as Pillow always does).
      dtype: ``"uint8"`` (default) or ``"float32"``; float32 is ``(pixel - mean) / std`` per channel.
      mean, std: per-channel (R, G, B) or one number, on the 0-255 scale like DALI's crop_mirror_normalize
        (ImageNet: ``mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)``); float32 only;
        default 0 and 1.
      layout: ``"HWC"`` (default) or ``"CHW"``.
      pad_value: the 0-255 pixel value of the letterbox padding (padded before normalization).

    Every argument is checked here: a bad one raises ValueError at construction. The resize itself runs on
    the uint8 pixels (rounded), then the normalization in float32, as ``ToTensor`` after a Pillow resize does.
    """

    size: Union[int, Tuple[int, int]]
    crop: Optional[Union[int, Tuple[int, int]]] = None
    mode: str = "shorter"
    interpolation: str = "linear"
    antialias: bool = True
    dtype: str = "uint8"
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None
    layout: str = "HWC"
    pad_value: int = 0

    def __init__(self, size, *, crop=None, mode="shorter", interpolation="linear", antialias=True,
                 dtype="uint8", mean=None, std=None, layout="HWC", pad_value=0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "shorter":
            size = _side("size (the shorter side, mode='shorter')", size)
            if crop is not None:
                crop = _pair("crop", crop)
                if max(crop) > size:
                    raise ValueError(f"crop {crop} is larger than size={size}, the shorter side after the resize")
        else:
            size = _pair(f"size (mode={mode!r})", size)
            if crop is not None:
                raise ValueError(f"crop is for mode='shorter' only, got crop={crop!r} with mode={mode!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        if not isinstance(antialias, bool):
            raise ValueError(f"antialias must be True or False, got {antialias!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if dtype == "uint8" and (mean is not None or std is not None):
            raise ValueError(f"mean and std need dtype='float32', got dtype={dtype!r} with mean={mean!r}, std={std!r}")
        if mean is not None:
            mean = _channels("mean", mean, 0.0)
        if std is not None:
            std = _channels("std", std, 1.0)
            if min(std) <= 0:
                raise ValueError(f"std must be > 0, got {std!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if isinstance(pad_value, bool) or not isinstance(pad_value, numbers.Integral) or not 0 <= pad_value <= 255:
            raise ValueError(f"pad_value must be an integer in [0, 255], got {pad_value!r}")
        for name, value in (("size", size), ("crop", crop), ("mode", mode), ("interpolation", interpolation),
                            ("antialias", antialias), ("dtype", dtype), ("mean", mean), ("std", std),
                            ("layout", layout), ("pad_value", int(pad_value))):
            object.__setattr__(self, name, value)

    # -- geometry -----------------------------------------------------------------------------------------------

    @property
    def fixed_shape(self) -> bool:
        """Whether every output has the same shape (a crop, letterbox or stretch)."""
        return self.mode != "shorter" or self.crop is not None

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def geometry(self, height: int, width: int) -> Tuple[Tuple[int, int], Optional[Tuple[int, int, int, int]]]:
        """For an (oriented) image of ``height`` x ``width``: the resized size ``(h, w)`` and the window
        ``(top, left, h, w)`` taken from it (negative top/left: padding), or None for the whole resized image."""
        # A header may claim a side of 0 (a frame that never decodes, a failure later): plan it as 1, so that the
        # sizes planned from headers never divide by zero.
        height, width = max(1, height), max(1, width)
        if self.mode == "stretch":
            return tuple(self.size), None  # type: ignore[return-value]
        if self.mode == "letterbox":
            out_h, out_w = self.size  # type: ignore[misc]
            scale = min(out_h / height, out_w / width)
            rh = min(out_h, max(1, round(height * scale)))
            rw = min(out_w, max(1, round(width * scale)))
            return (rh, rw), (-((out_h - rh) // 2), -((out_w - rw) // 2), out_h, out_w)
        s = self.size
        if height <= width:
            rh, rw = s, max(1, int(s * width / height))
        else:
            rh, rw = max(1, int(s * height / width)), s
        if self.crop is None:
            return (rh, rw), None
        ch, cw = self.crop  # type: ignore[misc]
        return (rh, rw), (int(round((rh - ch) / 2.0)), int(round((rw - cw) / 2.0)), ch, cw)

    def output_shape(self, height: int, width: int) -> Tuple[int, int, int]:
        """The output's shape (in ``layout``) for an oriented image of ``height`` x ``width``."""
        (rh, rw), window = self.geometry(height, width)
        h, w = (rh, rw) if window is None else window[2:]
        return (3, h, w) if self.layout == "CHW" else (h, w, 3)

    def output_nbytes(self, height: int, width: int) -> int:
        """The output's bytes; the same for the stored frame and the oriented image (a transposition keeps them)."""
        return math.prod(self.output_shape(height, width)) * self.np_dtype.itemsize

    def stored_geometry(self, height: int, width: int, orientation: int):
        """``geometry`` mapped onto the stored frame (``height`` x ``width`` as stored, EXIF ``orientation``
        still to apply): ``(resized (h, w), anchor (top, left), shape (h, w))`` in stored coordinates, so that
        resizing the stored frame, taking that window and then orienting gives what resizing and windowing the
        oriented image gives."""
        swap, flip_rows, flip_cols = _WINDOW_MAP.get(orientation, _WINDOW_MAP[1])
        oh, ow = (width, height) if swap else (height, width)
        (rh, rw), window = self.geometry(oh, ow)
        top, left, h, w = (0, 0, rh, rw) if window is None else window
        if swap:  # stored rows are oriented columns
            rh, rw, top, left, h, w = rw, rh, left, top, w, h
        if flip_rows:
            top = rh - top - h
        if flip_cols:
            left = rw - left - w
        return (rh, rw), (top, left), (h, w)

    # -- the Pillow/numpy path ----------------------------------------------------------------------------------

    def apply_pillow(self, image) -> np.ndarray:
        """The output for an oriented RGB ``PIL.Image`` (after ``exif_transpose`` and ``convert("RGB")``)."""
        from PIL import Image

        (rh, rw), window = self.geometry(image.height, image.width)
        if (rh, rw) == (image.height, image.width):
            resized = np.asarray(image)
        elif self.antialias or (rh >= image.height and rw >= image.width):  # no shrink: the same either way
            resample = Image.BILINEAR if self.interpolation == "linear" else Image.BICUBIC
            resized = np.asarray(image.resize((rw, rh), resample, reducing_gap=None))
        else:
            resized = resample_without_antialias(np.asarray(image), rh, rw, self.interpolation)
        return self.finish(take_window(resized, window, self.pad_value))

    def finish(self, pixels: np.ndarray) -> np.ndarray:
        """Normalization and layout of uint8 HWC ``pixels`` (the resized, windowed image)."""
        if self.dtype == "float32":
            mean = np.asarray(self.mean or (0.0,) * 3, np.float32)
            std = np.asarray(self.std or (1.0,) * 3, np.float32)
            pixels = (pixels.astype(np.float32) - mean) / std
        if self.layout == "CHW":
            pixels = pixels.transpose(2, 0, 1)
        return np.ascontiguousarray(pixels)


def take_window(pixels: np.ndarray, window: Optional[Tuple[int, int, int, int]], pad_value: int) -> np.ndarray:
    """The ``(top, left, h, w)`` window of HWC ``pixels``; what lies outside them is ``pad_value``."""
    if window is None:
        return pixels
    top, left, h, w = window
    height, width = pixels.shape[:2]
    if top >= 0 and left >= 0 and top + h <= height and left + w <= width:
        return pixels[top : top + h, left : left + w]
    out = np.full((h, w) + pixels.shape[2:], pad_value, pixels.dtype)
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + h, height), min(left + w, width)
    if r1 > r0 and c1 > c0:
        out[r0 - top : r1 - top, c0 - left : c1 - left] = pixels[r0:r1, c0:c1]
    return out


def _taps(n_in: int, n_out: int, cubic: bool):
    """Source indices and weights ``(taps, n_out)`` of an interpolation without antialiasing, pixel centres
    aligned (``(i + 0.5) * n_in / n_out - 0.5``), edges clamped; cubic is Keys' with a = -0.5."""
    x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(x)
    t = x - base
    if cubic:
        offsets = np.arange(-1, 3)
        d = np.abs(t[None, :] - offsets[:, None])
        a = -0.5
        w = np.where(d <= 1, (a + 2) * d**3 - (a + 3) * d**2 + 1,
                     np.where(d < 2, a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a, 0.0))
    else:
        offsets = np.arange(0, 2)
        w = np.stack([1 - t, t])
    idx = np.clip(base[None, :].astype(np.int64) + offsets[:, None], 0, n_in - 1)
    return idx, (w / w.sum(axis=0, keepdims=True)).astype(np.float32)


def resample_without_antialias(pixels: np.ndarray, height: int, width: int, interpolation: str) -> np.ndarray:
    """HWC uint8 ``pixels`` resized to ``height`` x ``width`` by plain (not antialiased) linear or cubic
    interpolation, separably in float32, rounded once: what DALI's ``antialias=False`` does (Pillow has none)."""
    cubic = interpolation == "cubic"
    idx, w = _taps(pixels.shape[0], height, cubic)
    rows = sum(w[k][:, None, None] * pixels[idx[k]].astype(np.float32) for k in range(len(idx)))
    idx, w = _taps(pixels.shape[1], width, cubic)
    out = sum(w[k][None, :, None] * rows[:, idx[k]] for k in range(len(idx)))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
