"""Reading a JPEG's dimensions from its header, without decoding it (the decompression-bomb guard)."""

from __future__ import annotations

import io
from typing import Optional, Tuple

# Pillow's decompression-bomb threshold (PIL.Image.MAX_IMAGE_PIXELS): 1024 * 1024 * 1024 // 4 // 3.
DEFAULT_MAX_PIXELS = 89_478_485

# Start-of-frame markers carry the frame size. 0xC4 (DHT), 0xC8 (JPG) and 0xCC (DAC) share the range.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone, with no length field.
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01, 0xD8}


def jpeg_dimensions(data: bytes) -> Optional[Tuple[int, int]]:
    """Returns ``(width, height)`` from the first start-of-frame segment, or None if none is found.

    Walks the marker segments before the first scan; never touches the entropy-coded data, so the cost is
    independent of the image size.
    """
    header = _walk_header(data)
    return None if header is None else header[:2]


def has_complete_header(data: bytes) -> bool:
    """True when the bytes hold a JPEG whose marker segments, a frame header and a whole scan header included,
    are complete and followed by scan data.

    Only such bytes go to DALI: DALI 2.4's decoders can crash the process (not raise) on a batch holding bytes
    without them (garbage after the start-of-image marker, random bytes, a file cut inside its header);
    BENCHMARKS.md has the measurements. Anything else goes straight to the Pillow fallback.
    """
    header = _walk_header(data)
    return header is not None and header[2]


def _walk_header(data: bytes) -> Optional[Tuple[int, int, bool]]:
    """``(width, height, scan_follows)`` from the segments before the first scan, or None without a frame."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    frame = None
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker == 0xD9:  # end of image before any scan
            break
        length = (data[i + 2] << 8) | data[i + 3]
        if marker == 0xDA:  # the first scan: complete when its header is whole and data follows it
            if frame is None:
                return None
            return frame[0], frame[1], length >= 2 and i + 2 + length < n
        if marker in _SOF_MARKERS and frame is None:
            if i + 9 > n:
                return None
            height = (data[i + 5] << 8) | data[i + 6]
            width = (data[i + 7] << 8) | data[i + 8]
            frame = (width, height)
        if length < 2:
            break
        i += 2 + length
    return None if frame is None else (frame[0], frame[1], False)


class OverLimitError(ValueError):
    """Pillow refused to even open an image this large (its own decompression-bomb check)."""


def image_dimensions(data: bytes) -> Optional[Tuple[int, int]]:
    """JPEG header first; for anything else (a PNG named .jpg, junk before a marker) Pillow's lazy open.

    Raises OverLimitError where Pillow refuses to open the image for its size.
    """
    dims = jpeg_dimensions(data)
    if dims is not None:
        return dims
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Image.DecompressionBombError as e:
        raise OverLimitError(f"Pillow: {e}") from e
    except Exception:  # not an image Pillow knows either: the decoder will report it
        return None
