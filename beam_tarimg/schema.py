"""The one record schema of the Parquet and TFRecord sinks, and the image encodings they share.

Beam-free (numpy, and Pillow for the encoded formats): a row is one image. ``image_format`` says how its
image is stored:

* ``original`` (the default): the tar member's own bytes, unchanged (``ImageObject.encoded``); no re-encode.
* ``png`` / ``jpeg``: the decoded pixels re-encoded with Pillow (lossless / lossy, ``jpeg_quality``).
* ``raw``: the decoded pixels, HxWxC uint8, row-major (for numpy/torch: ``np.frombuffer(b, np.uint8)
  .reshape(h, w, c)``).

Images resized on decode (``beam_tarimg.Resize``) are written as ``raw``, ``png`` or ``jpeg`` when they are uint8
HxWxC; float32 or CHW outputs (model input) are refused, and so is ``original`` for a resized image (its
member's bytes are not those pixels): a ValueError naming the image.

| field            | Parquet                              | TFRecord (tf.train.Example) | content                            |
| ---              | ---                                  | ---                         | ---                                |
| ``image_id``     | string                               | ``image/source_id`` bytes   | the webdataset key, e.g. ``000000031`` |
| ``image_path``   | string                               | ``image/filename`` bytes    | ``<tar name>/<member>``, e.g. ``00000.tar/000000031.jpg`` |
| ``height``       | int32                                | ``image/height`` int64      | rows of the decoded image          |
| ``width``        | int32                                | ``image/width`` int64       | columns of the decoded image       |
| ``channels``     | int32                                | ``image/channels`` int64    | 3 for RGB (1 for a 2-D image written by other code) |
| ``image_format`` | string                               | ``image/format`` bytes      | Parquet: ``original``/``png``/``jpeg``/``raw``; TFRecord: what the bytes are (``jpeg``, ``png``) or ``raw`` |
| ``image``        | struct<bytes: binary, path: string>  | ``image/encoded`` bytes     | encoded formats: the image file's bytes (path: ``image_path``) |
| ``image_data``   | binary                               | ``image/raw`` bytes         | ``raw`` only: HxWxC uint8 pixels   |
| ``metadata``     | string (JSON)                        | ``image/metadata`` bytes    | the image's metadata dict, ``{}`` when none |

A Parquet file has either ``image`` (encoded formats: Hugging Face's ``Image`` storage, so that
``datasets``, the Hub viewer and friends see images) or ``image_data`` (``raw``), never both.

``height``, ``width`` and ``channels`` are always those of the decoded pixels, whatever ``image_format``: the
decode applies the EXIF orientation (as ``PIL.ImageOps.exif_transpose`` does), so for an ``original`` JPEG
whose EXIF orientation is 5-8 (a quarter turn) they are the stored frame's width and height swapped. A decoder
that applies the tag (Pillow + ``exif_transpose``, Hugging Face ``datasets`` >= 2.19, DALI) gives exactly
``height`` x ``width``; one that ignores it (``tf.io.decode_jpeg``) gives the stored frame.

Files written before ``original`` existed (``image_data`` holding raw, png or jpeg bytes; TFRecord features
named like the Parquet columns) are still read.
"""

from __future__ import annotations

import io
import json
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from beam_tarimg.types import ImageBatch, ImageObject

IMAGE_ID = "image_id"
IMAGE_PATH = "image_path"
HEIGHT = "height"
WIDTH = "width"
CHANNELS = "channels"
IMAGE_FORMAT = "image_format"
IMAGE_DATA = "image_data"
IMAGE = "image"
METADATA = "metadata"

FIELDS = (IMAGE_ID, IMAGE_PATH, HEIGHT, WIDTH, CHANNELS, IMAGE_FORMAT, IMAGE_DATA, IMAGE, METADATA)
# What a reader cannot do without (and one of IMAGE_DATA, IMAGE); image_format and metadata may be missing
# from files written by other code.
REQUIRED_FIELDS = (IMAGE_ID, IMAGE_PATH, HEIGHT, WIDTH, CHANNELS)

ORIGINAL, RAW, JPEG, PNG = "original", "raw", "jpeg", "png"
IMAGE_FORMATS = (ORIGINAL, RAW, PNG, JPEG)
ENCODED_FORMATS = (ORIGINAL, PNG, JPEG)
DEFAULT_IMAGE_FORMAT = ORIGINAL

# Parquet compression codecs (what pyarrow's ParquetWriter, and so Beam's WriteToParquet, accepts).
PARQUET_CODECS = ("none", "snappy", "gzip", "brotli", "lz4", "zstd")

# TFRecord feature keys: the tf.train.Example conventions of TensorFlow's image tooling.
TF_ENCODED = "image/encoded"
TF_RAW = "image/raw"
TF_FORMAT = "image/format"
TF_HEIGHT = "image/height"
TF_WIDTH = "image/width"
TF_CHANNELS = "image/channels"
TF_FILENAME = "image/filename"
TF_SOURCE_ID = "image/source_id"
TF_METADATA = "image/metadata"

# File signatures of the encodings an ``original`` image may have (a member named .jpg may hold a PNG that
# DALI or the Pillow fallback decoded): what TFRecord's image/format says.
_SIGNATURES = (
    (b"\xff\xd8\xff", JPEG),
    (b"\x89PNG\r\n\x1a\n", PNG),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)

_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_EXIF_ORIENTATION = 0x0112


def check_int(name: str, value, minimum: int) -> None:
    """Raises ValueError naming the bad value unless it is an int (not a bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_sink_args(file_path_prefix, file_name_suffix, num_shards, image_format, jpeg_quality) -> None:
    """The checks both file sinks make; raises ValueError naming the bad value."""
    if not isinstance(file_path_prefix, str) or not file_path_prefix:
        raise ValueError(f"file_path_prefix must be a non-empty string, got {file_path_prefix!r}")
    if not isinstance(file_name_suffix, str):
        raise ValueError(f"file_name_suffix must be a string, got {file_name_suffix!r}")
    check_int("num_shards", num_shards, 0)
    check_image_format(image_format, jpeg_quality)


def check_image_format(image_format, jpeg_quality) -> None:
    """Raises ValueError naming the bad value."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, int) or not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be an integer in [1, 100], got {jpeg_quality!r}")


def pixels_hwc(image_path: str, pixels: np.ndarray) -> Tuple[np.ndarray, int, int, int]:
    """A C-contiguous uint8 view of ``pixels`` and its height, width and channels (2-D means 1 channel).

    The sinks store uint8 HxWxC images only: float32 or CHW outputs of a ``Resize`` (model input) are refused."""
    a = np.asarray(pixels)
    if a.dtype != np.uint8:
        raise ValueError(f"image_data of {image_path!r} must be uint8 to be written, got {a.dtype} (the sinks "
                         f"store images: resize on decode with dtype='uint8', layout='HWC' to write them)")
    if a.ndim == 2:
        h, w, c = a.shape[0], a.shape[1], 1
    elif a.ndim == 3:
        h, w, c = a.shape
    else:
        raise ValueError(f"image_data of {image_path!r} must be HxW or HxWxC, got shape {a.shape}")
    if c > 4:
        raise ValueError(f"image_data of {image_path!r} has shape {a.shape}: {c} channels (CHW pixels?); the "
                         f"sinks store HxWxC images (resize on decode with layout='HWC' to write them)")
    return np.ascontiguousarray(a), h, w, c


def check_untouched(image: ImageObject, h: int, w: int) -> None:
    """Raises ValueError when ``image.encoded`` is not an image of ``h`` x ``w`` (after its EXIF orientation):
    pixels resized on decode, whose ``original`` row would pair the member's bytes with another size."""
    from beam_tarimg.jpeg import frame_size, image_dimensions, parse_jpeg

    frame = frame_size(image.encoded)  # the common case in microseconds: untouched pixels have the frame's size
    if frame is not None and (h, w) in ((frame[1], frame[0]), (frame[0], frame[1])):
        return
    header = parse_jpeg(image.encoded)
    try:
        dims = image_dimensions(image.encoded, header)
    except Exception:  # over Pillow's own limits: nothing to compare with
        return
    if dims is None:
        return
    sw, sh = dims
    turned = (header.orientation or 1) >= 5 if header is not None else None
    fits = (h, w) == ((sw, sh) if turned else (sh, sw)) or (turned is None and (h, w) == (sw, sh))
    if not fits:
        eh, ew = (sw, sh) if turned else (sh, sw)
        raise ValueError(
            f"cannot write {image.image_path!r} as original: its pixels are {h}x{w} (HxW), its encoded image "
            f"{eh}x{ew} (resized on decode?); 'original' stores untouched images only: write raw, png or jpeg"
        )


def image_payload(image: ImageObject, image_format: str, jpeg_quality: int):
    """``(data, h, w, c)`` of one image: its stored bytes in ``image_format`` and its decoded shape.

    ``original`` gives ``image.encoded`` itself; raises ValueError for an image that has none.
    """
    pixels, h, w, c = pixels_hwc(image.image_path, image.image_data)
    if image_format == ORIGINAL:
        if image.encoded is None:
            raise ValueError(
                f"cannot write {image.image_path!r} as original: it carries no encoded bytes (only images "
                f"decoded by ReadImagesFromTars or read back from an encoded format do); write raw, png or jpeg"
            )
        check_untouched(image, h, w)
        return image.encoded, h, w, c
    return encode_pixels(image.image_path, pixels, h, w, c, image_format, jpeg_quality), h, w, c


def encoding_name(data) -> str:
    """What encoded bytes are, by their file signature: ``jpeg``, ``png``, ``gif``, ``bmp``, ``tiff``, ``webp``,
    or ``unknown``."""
    head = bytes(data[:12])
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return "unknown"


def encode_pixels(image_path: str, pixels: np.ndarray, h: int, w: int, c: int, image_format: str,
                  jpeg_quality: int):
    """The stored bytes of decoded pixels: a uint8 buffer (raw, no copy) or png/jpeg bytes."""
    if image_format == RAW:
        return memoryview(pixels).cast("B")
    from PIL import Image

    mode = _PIL_MODES.get(c)
    if mode is None or (image_format == JPEG and c == 4):
        raise ValueError(f"cannot write {image_path!r} as {image_format}: it has {c} channels")
    img = Image.fromarray(pixels.reshape(h, w) if c == 1 else pixels, mode)
    buf = io.BytesIO()
    if image_format == JPEG:
        img.save(buf, "JPEG", quality=jpeg_quality)
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


def metadata_json(image_path: str, metadata: Optional[Dict[str, Any]]) -> str:
    """Sorted-key JSON of the metadata dict (numpy scalars and arrays become numbers and lists)."""
    try:
        return json.dumps(metadata or {}, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                          default=_json_default)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata of {image_path!r} cannot be written as JSON: {e}") from e


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def parse_metadata(text) -> Dict[str, Any]:
    if text is None or text == "" or text == b"":
        return {}
    value = json.loads(text)
    return value if isinstance(value, dict) else {"json": value}


def sniff_format(data, h: int, w: int, c: int) -> str:
    """For old rows without ``image_format``: raw when the size is HxWxC, else by the JPEG/PNG signature."""
    n = len(data)
    if n == h * w * c:
        return RAW
    head = bytes(data[:8])
    if head[:3] == b"\xff\xd8\xff":
        return JPEG
    if head == b"\x89PNG\r\n\x1a\n":
        return PNG
    raise ValueError(f"image_data of {n} bytes is neither {h}x{w}x{c} raw pixels nor a JPEG or PNG")


def decode_pixels(image_path: str, data, image_format: Optional[str], h: int, w: int, c: int) -> np.ndarray:
    """The HxWxC uint8 pixels of one row. Raw data comes back as a read-only view of ``data``; encoded data
    is decoded with Pillow, EXIF orientation applied (as the tar reader's decode does)."""
    if not image_format:
        image_format = sniff_format(data, h, w, c)
    if image_format == RAW:
        a = np.frombuffer(data, dtype=np.uint8)
        if a.size != h * w * c:
            raise ValueError(f"{image_path!r}: raw image_data has {a.size} bytes, expected {h}x{w}x{c}")
        return a.reshape(h, w, c)
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"{image_path!r}: unknown image_format {image_format!r}")
    from PIL import Image, ImageOps

    mode = _PIL_MODES.get(c)
    if mode is None:
        raise ValueError(f"{image_path!r}: cannot decode {image_format} data into {c} channels")
    with Image.open(io.BytesIO(bytes(data))) as img:
        if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            img = ImageOps.exif_transpose(img)
        a = np.asarray(img.convert(mode) if img.mode != mode else img)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape != (h, w, c):
        raise ValueError(f"{image_path!r}: {image_format} data decodes to {a.shape}, the row says {(h, w, c)}")
    return a


def tar_name(image_path: str) -> str:
    """The tar's file name recorded in an ``image_path`` (``""`` when the path has no ``/``)."""
    head, sep, _ = image_path.partition("/")
    return head if sep else ""


class BatchGrouper:
    """Groups consecutive images read back from one file into ImageBatches of up to ``batch_size`` images of
    one tar. A batch's ``tar_path`` is the tar name in its images' ``image_path`` (``source_path`` when the
    path has no ``/``)."""

    def __init__(self, source_path: str, batch_size: int):
        self._source = source_path
        self._batch_size = batch_size
        self._tar = None
        self._images: List[ImageObject] = []

    def add(self, image: ImageObject) -> Iterator[ImageBatch]:
        tar = tar_name(image.image_path) or self._source
        if self._images and (tar != self._tar or len(self._images) >= self._batch_size):
            yield from self.flush()
        self._tar = tar
        self._images.append(image)

    def flush(self) -> Iterator[ImageBatch]:
        if self._images:
            yield ImageBatch(self._tar, self._images)
            self._images = []
