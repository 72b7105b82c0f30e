"""Every beam_tarimg counter of one mixed run, asserted exactly, on a named runner (the FnApiRunner)."""

from __future__ import annotations

import os
import tarfile

import numpy as np

from beam_tarimg.types import FailureStage
from conftest import dir_member, link_member, make_jpeg, pillow_rgb, write_tar

# Every counter the transforms define (transforms._ReadTarsFn and _DecodeBatchesFn docstrings).
ALL_COUNTERS = {
    "tars_read", "tars_failed", "tars_corrupt", "tars_without_images", "members_skipped", "members_not_files",
    "images_over_limit", "images_failed", "bytes_read", "images_decoded_cpu", "images_decoded_gpu",
    "images_decoded_fallback", "decoders_built", "dali_rebuilds", "decoder_crashes",
}


def _png(seed: int) -> bytes:
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_counters__a_mixed_run_counts_each_member_exactly_once_where_it_belongs(read_tars, tmp_path):
    good = {f"g{i}.jpg": make_jpeg(100 + i) for i in range(4)}
    corrupt = b"\xff\xd8\xff\xe0" + b"this is not the rest of a JPEG" * 4  # neither DALI nor Pillow decodes it
    jpeg = make_jpeg(7)
    sos = jpeg.index(b"\xff\xda")
    junk = jpeg[:sos] + b"\0\0" + jpeg[sos:]  # junk before a marker: kept from DALI, Pillow decodes it
    truncated = make_jpeg(8)[:1000]  # passes the structure check; DALI and Pillow both fail on it
    huge = make_jpeg(9, 120, 100)  # 12,000 pixels: over max_pixels below
    mixed = write_tar(tmp_path / "mixed.tar", [
        ("g0.jpg", good["g0.jpg"]), ("g0.json", b'{"label": 0}'), ("g0.txt", b"a caption"),
        ("g1.jpg", good["g1.jpg"]), ("g1.json", b"{not json"),  # metadata failure, image kept
        ("bad.jpg", corrupt),  # decode failure
        ("png.jpg", _png(1)),  # a PNG named .jpg: decoded by the Pillow fallback
        ("junk.jpg", junk),
        ("trunc.jpg", truncated),  # decode failure, after DALI failed its run (rebuilds)
        ("huge.jpg", huge),  # limit failure (max_pixels)
        ("empty.jpg", b""),  # decode failure at the read stage
        dir_member("dir.jpg"),  # a JPEG-named member that is not a file: read failure
        link_member("link.jpg", "g0.jpg"),  # a symbolic link: read failure
        ("README.md", b"not an image"),  # skipped
        ("orphan.json", b'{"x": 1}'),  # a sidecar of no image: skipped
        ("g2.jpg", good["g2.jpg"]),
    ])
    cut = write_tar(tmp_path / "cut.tar", [("g3.jpg", good["g3.jpg"]), ("next.jpg", make_jpeg(9))])
    with tarfile.open(cut) as tf:
        next_data = tf.getmember("next.jpg").offset_data
    with open(cut, "r+b") as f:
        f.truncate(next_data + 100)  # g3 whole; next.jpg's data cut off
    no_images = write_tar(tmp_path / "no_images.tar", [("notes.txt", b"hello"), ("data.bin", b"\0" * 10)])
    missing = str(tmp_path / "missing.tar")

    result = read_tars([mixed, cut, no_images, missing], batch_size=4, include_metadata=True, max_pixels=10_000)

    failures = sorted((os.path.basename(f.tar_path), f.member, f.stage) for f in result.failures)
    assert failures == sorted([
        ("mixed.tar", "g1.json", FailureStage.METADATA),
        ("mixed.tar", "bad.jpg", FailureStage.DECODE),
        ("mixed.tar", "trunc.jpg", FailureStage.DECODE),
        ("mixed.tar", "huge.jpg", FailureStage.LIMIT),
        ("mixed.tar", "empty.jpg", FailureStage.DECODE),
        ("mixed.tar", "dir.jpg", FailureStage.READ),
        ("mixed.tar", "link.jpg", FailureStage.READ),
        ("cut.tar", None, FailureStage.READ),
        ("missing.tar", None, FailureStage.OPEN),
    ])
    images = result.by_member()
    assert sorted(images) == ["g0.jpg", "g1.jpg", "g2.jpg", "g3.jpg", "junk.jpg", "png.jpg"]
    for name in ("g0.jpg", "g1.jpg", "g2.jpg", "g3.jpg"):
        assert np.array_equal(images[name].image_data, pillow_rgb(good[name])), name
    assert images["g0.jpg"].metadata == {"label": 0, "caption": "a caption"}
    assert images["g1.jpg"].metadata == {}

    expected = {
        "tars_read": 3,  # mixed, cut, no_images (a corrupt tar is read, as far as it goes)
        "tars_failed": 1,  # missing
        "tars_corrupt": 1,  # cut
        "tars_without_images": 1,  # no_images
        # README.md, orphan.json; notes.txt and data.bin
        "members_skipped": 4,
        "members_not_files": 2,  # dir.jpg, link.jpg
        "images_over_limit": 1,  # huge.jpg
        # huge, empty, dir, link (read stage); bad, trunc (decode). Not g1.json: a metadata failure keeps its image.
        "images_failed": 6,
        "bytes_read": os.path.getsize(mixed) + os.path.getsize(cut) + os.path.getsize(no_images),
        "images_decoded_cpu": 4,  # g0-g3
        "images_decoded_fallback": 2,  # png.jpg, junk.jpg
        "decoders_built": 1,
        # The second batch is junk, trunc, g2; junk goes to Pillow without DALI, so DALI runs [trunc, g2]: it
        # fails (rebuild), then [trunc] alone fails (rebuild), [g2] decodes.
        "dali_rebuilds": 2,
    }
    assert {k: v for k, v in result.counters.items() if v} == expected
    assert set(result.counters) <= ALL_COUNTERS
