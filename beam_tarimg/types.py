"""The records that move through the pipeline: images, batches and failures.

Beam-free on purpose: the decode core imports these on machines that have only DALI, numpy and Pillow.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterator, List, NamedTuple, Optional

import numpy as np


@dataclasses.dataclass(eq=False)
class ImageObject:
    """One decoded image.

    Attributes:
      image_path: ``"<tar file name>/<member path>"``, e.g. ``"00000.tar/000000031.jpg"``.
      image_id: the member path without its extension (the webdataset key), e.g. ``"000000031"``.
      image_data: ``numpy.uint8`` array of shape (H, W, 3), RGB, original size, EXIF orientation applied.
        With a ``resize`` (``beam_tarimg.Resize``) on the reader: the transformed image instead, (H, W, 3) or
        (3, H, W) as its ``layout`` says, uint8 or float32 (normalized) as its ``dtype`` says.
        Arrays that crossed a Beam coder are read-only views of the encoded bytes: copy before editing
        in place. Arrays fresh from the decoder are views of their decode run's buffer (the decoder
        process's shared-memory slot; with ``isolation="none"``, DALI's output buffer): an image kept after
        its batch is gone keeps the whole run's pixels in memory (about 0.5 MB x batch size for
        ImageNet-sized images) and that slot out of reuse; ``.copy()`` the images you keep.
      metadata: a dict; empty unless sidecars were asked for (see ``ReadImagesFromTars``).
      encoded: the encoded image whose decode gave ``image_data`` (before any resize), unchanged: the tar
        member's own bytes (as ``ReadImagesFromTars`` read them; they still carry any EXIF orientation tag),
        or the stored bytes of a row read back from an encoded format. None for pixels from anywhere else. It
        is what ``image_format="original"`` writes (refused for a resized image). The same ``bytes`` object
        as the decode's input: no copy.
    """

    image_path: str
    image_id: str
    image_data: np.ndarray
    metadata: Dict[str, Any] = dataclasses.field(default_factory=dict)
    encoded: Optional[bytes] = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImageObject):
            return NotImplemented
        return (
            self.image_path == other.image_path
            and self.image_id == other.image_id
            and self.metadata == other.metadata
            and self.encoded == other.encoded
            and self.image_data.shape == other.image_data.shape
            and self.image_data.dtype == other.image_data.dtype
            and np.array_equal(self.image_data, other.image_data)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"ImageObject(image_path={self.image_path!r}, image_id={self.image_id!r}, "
            f"image_data=<{self.image_data.dtype} {self.image_data.shape}>, metadata={self.metadata!r}, "
            f"encoded={'None' if self.encoded is None else f'<{len(self.encoded)} bytes>'})"
        )


@dataclasses.dataclass(eq=False)
class ImageBatch:
    """Decoded images of one tar, in tar order. ``tar_path`` is the full path of that tar."""

    tar_path: str
    images: List[ImageObject]

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[ImageObject]:
        return iter(self.images)

    def __getitem__(self, index: int) -> ImageObject:
        return self.images[index]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImageBatch):
            return NotImplemented
        return self.tar_path == other.tar_path and self.images == other.images

    __hash__ = None  # type: ignore[assignment]

    @property
    def nbytes(self) -> int:
        """Bytes of decoded pixels held by this batch."""
        return sum(image.image_data.nbytes for image in self.images)

    @property
    def pixels(self) -> Optional[np.ndarray]:
        """All images as one array, shape ``(N,) + image shape`` (a model's input), when every image has the
        same shape and dtype; None otherwise (or for an empty batch). No copy when the images lie one after the
        other in one buffer (as the decoder hands them out: one run's pixels in one buffer); a stacked copy
        otherwise."""
        return stack_images([image.image_data for image in self.images])


def stack_images(arrays: List[np.ndarray]) -> Optional[np.ndarray]:
    """``arrays`` as one ``(N,) + shape`` array: a view when they are consecutive C-contiguous pieces of one
    buffer, else ``np.stack``; None when there are none or their shapes or dtypes differ."""
    if not arrays:
        return None
    first = arrays[0]
    if any(a.shape != first.shape or a.dtype != first.dtype for a in arrays):
        return None
    n = len(arrays)
    if all(a.flags.c_contiguous for a in arrays) and first.size:
        start = first.__array_interface__["data"][0]
        step = first.nbytes
        if all(a.__array_interface__["data"][0] == start + i * step for i, a in enumerate(arrays)):
            base = first
            while isinstance(base.base, np.ndarray):
                base = base.base
            if base.flags.c_contiguous:
                origin = base.__array_interface__["data"][0]
                offset = start - origin
                if offset >= 0 and offset + n * step <= base.nbytes:
                    flat = base.reshape(-1).view(np.uint8)[offset : offset + n * step]
                    return flat.view(first.dtype).reshape((n,) + first.shape)
    return np.stack(arrays)


class EncodedImage(NamedTuple):
    """One JPEG member read from a tar, not yet decoded."""

    member: str
    image_id: str
    data: bytes
    metadata: Dict[str, Any]


@dataclasses.dataclass(eq=False)
class EncodedBatch:
    """Up to ``batch_size`` encoded JPEGs of one tar, in tar order: what crosses the shuffle.

    ``headers``: the read stage's ``jpeg.parse_jpeg`` of each image, so that a decode in the same process
    need not walk the markers again; not encoded by the coder (None after a shuffle) nor compared."""

    tar_path: str
    images: List[EncodedImage]
    headers: Optional[List[Any]] = None

    def __len__(self) -> int:
        return len(self.images)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EncodedBatch):
            return NotImplemented
        return self.tar_path == other.tar_path and self.images == other.images

    __hash__ = None  # type: ignore[assignment]

    @property
    def nbytes(self) -> int:
        return sum(len(image.data) for image in self.images)


class FailureStage:
    """Where an input was lost. The values are the ``stage`` of an ``ImageFailure``."""

    OPEN = "open"  # the tar could not be opened (missing, unreadable, a directory)
    # With member None: not a tar, cut off, corrupt, or data after its end (every whole member before was read);
    # with a member: a JPEG-named member that is not a regular file (link, directory, device, FIFO, sparse file).
    READ = "read"
    LIMIT = "limit"  # over max_pixels (or Pillow's own bomb limit) or max_member_bytes; never decoded
    DECODE = "decode"  # neither DALI nor the Pillow fallback could decode it, or it crashed the decoder process
    METADATA = "metadata"  # a sidecar could not be parsed; its image, if any, was still emitted without it

    ALL = (OPEN, READ, LIMIT, DECODE, METADATA)


class ImageFailure(NamedTuple):
    """A failure record: which tar, which member (None for the tar as a whole), which stage, what error."""

    tar_path: str
    member: Optional[str]
    stage: str
    error: str

    def to_dict(self) -> Dict[str, Optional[str]]:
        return {"tar": self.tar_path, "member": self.member, "stage": self.stage, "error": self.error}
