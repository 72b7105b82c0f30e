"""The ImageBatch and EncodedBatch coders: exact, deterministic round trips; cheap size estimates."""

from __future__ import annotations

import numpy as np
import pytest
from apache_beam import coders

from beam_tarimg.coders import EncodedBatchCoder, ImageBatchCoder
from beam_tarimg.types import EncodedBatch, EncodedImage, ImageBatch, ImageObject


def _batch():
    rng = np.random.default_rng(0)
    return ImageBatch(
        "gs://bucket/data/00001.tar",
        [
            ImageObject("00001.tar/a.jpg", "a", rng.integers(0, 255, (5, 7, 3), dtype=np.uint8), {"x": 1, "b": [1, 2]}),
            ImageObject("00001.tar/dir/ünïcode.jpg", "dir/ünïcode", np.zeros((0, 3, 3), np.uint8), {}),
            ImageObject("00001.tar/c.jpg", "c", rng.integers(0, 255, (2, 2, 3), dtype=np.uint8), {"caption": "héllo"}),
        ],
    )


def test_image_batch_coder__round_trips_exactly():
    coder = ImageBatchCoder()
    batch = _batch()
    decoded = coder.decode(coder.encode(batch))
    assert decoded == batch
    assert [i.image_data.shape for i in decoded] == [(5, 7, 3), (0, 3, 3), (2, 2, 3)]


def test_image_batch_coder__round_trips_the_encoded_bytes_and_their_absence():
    coder = ImageBatchCoder()
    batch = _batch()
    batch.images[0].encoded = b"\xff\xd8\xff\xe0 the member's own bytes"
    batch.images[2].encoded = b""
    decoded = coder.decode(coder.encode(batch))
    assert [i.encoded for i in decoded] == [batch.images[0].encoded, None, b""]
    assert decoded == batch
    assert abs(coder.estimate_size(batch) - len(coder.encode(batch))) <= 300


def test_image_objects_with_different_encoded_bytes_are_not_equal():
    a, b = _batch(), _batch()
    b.images[0].encoded = b"\xff\xd8"
    assert a != b


def test_image_batch_coder__is_deterministic_for_equal_batches_with_reordered_metadata():
    coder = ImageBatchCoder()
    a, b = _batch(), _batch()
    b.images[0].metadata = {"b": [1, 2], "x": 1}
    assert coder.is_deterministic()
    assert coder.encode(a) == coder.encode(b)


def test_image_batch_coder__moves_pixels_as_raw_bytes_not_pickles():
    coder = ImageBatchCoder()
    batch = _batch()
    encoded = coder.encode(batch)
    assert batch.images[0].image_data.tobytes() in encoded
    assert len(encoded) < batch.nbytes + 400


def test_image_batch_coder__estimate_size_is_close_without_encoding():
    coder = ImageBatchCoder()
    batch = _batch()
    assert abs(coder.estimate_size(batch) - len(coder.encode(batch))) <= 300


def test_image_batch_coder__non_json_metadata_still_round_trips():
    coder = ImageBatchCoder()
    batch = ImageBatch("t.tar", [ImageObject("t.tar/a.jpg", "a", np.ones((1, 1, 3), np.uint8), {"when": (1, 2)})])
    assert coder.decode(coder.encode(batch)).images[0].metadata == {"when": (1, 2)}


def test_encoded_batch_coder__round_trips_exactly():
    coder = EncodedBatchCoder()
    batch = EncodedBatch("t.tar", [EncodedImage("a.jpg", "a", b"\xff\xd8abc", {"k": "v"}), EncodedImage("b.jpg", "b", b"", {})])
    assert coder.decode(coder.encode(batch)) == batch
    assert coder.estimate_size(batch) >= len(coder.encode(batch))


def test_coders__are_registered_for_their_types():
    import beam_tarimg.transforms  # noqa: F401  (importing the transforms registers the coders)

    assert isinstance(coders.registry.get_coder(ImageBatch), ImageBatchCoder)
    assert isinstance(coders.registry.get_coder(EncodedBatch), EncodedBatchCoder)


def test_coders__nested_in_a_kv_as_a_shuffle_does():
    kv = coders.TupleCoder([coders.VarIntCoder(), ImageBatchCoder()])
    batch = _batch()
    key, decoded = kv.decode(kv.encode((7, batch)))
    assert key == 7 and decoded == batch


def test_coders__reject_a_truncated_payload():
    coder = ImageBatchCoder()
    with pytest.raises(Exception):
        coder.decode(coder.encode(_batch())[:-10])


def _uniform_batch(n=5, shape=(3, 224, 224), dtype=np.float32):
    rng = np.random.default_rng(1)
    block = rng.standard_normal((n,) + shape).astype(dtype)
    images = [ImageObject(f"t.tar/{k}.jpg", str(k), block[k], {"k": k} if k % 2 else {},
                          encoded=b"\xff\xd8 member" if k != 2 else None) for k in range(n)]
    return ImageBatch("t.tar", images), block


def test_image_batch_coder__a_uniform_float32_chw_batch_is_one_block_decoded_to_consecutive_views():
    coder = ImageBatchCoder()
    batch, block = _uniform_batch()
    encoded = coder.encode(batch)
    decoded = coder.decode(encoded)
    assert decoded == batch
    pixels = decoded.pixels
    assert pixels.shape == (5, 3, 224, 224) and pixels.dtype == np.float32 and np.array_equal(pixels, block)
    assert all(np.shares_memory(pixels, image.image_data) for image in decoded)  # no copy: views of the block
    assert pixels.__array_interface__["data"][0] % 64 == (
        np.frombuffer(encoded, np.uint8).__array_interface__["data"][0] % 64)  # aligned to the payload's start
    # Framing: one dtype and shape for the batch, not per image.
    per_image = len(coder.encode(ImageBatch("t.tar", [batch.images[0]])))
    assert len(encoded) - block.nbytes < 5 * (per_image - block[0].nbytes)
    assert abs(coder.estimate_size(batch) - len(encoded)) <= 400


def test_image_batch_coder__a_uniform_batch_not_consecutive_in_memory_round_trips_too():
    coder = ImageBatchCoder()
    batch, block = _uniform_batch(4, (6, 5, 3), np.uint8)
    for image, k in zip(batch.images, (3, 0, 2, 1)):
        image.image_data = block[k].copy()  # separate arrays, another order
    decoded = coder.decode(coder.encode(batch))
    assert decoded == batch and np.array_equal(decoded.pixels, block[[3, 0, 2, 1]])
    assert np.shares_memory(decoded.pixels, decoded.images[3].image_data)
