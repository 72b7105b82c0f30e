"""The Beam-free decode core, ImageDecoder, with real DALI on the CPU."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from beam_tarimg.decode import DaliDecoder, ImageDecoder, resolve_device
from bench import fuzz_pixels as FP
from beam_tarimg.jpeg import has_complete_header, image_dimensions, jpeg_dimensions
from beam_tarimg.sample import imagenet_like_jpeg
from conftest import make_jpeg, pillow_rgb


@pytest.fixture(scope="module")
def decoder():
    return ImageDecoder(max_batch_size=8, num_threads=2, device="cpu")


def test_decoder__matches_pillow_on_the_imagenet_like_mix(decoder):
    rng = np.random.default_rng(5)
    blobs = [imagenet_like_jpeg(rng, i) for i in range(20)]  # 4:2:0, 4:4:4, progressive, grayscale
    outcomes = decoder.decode(blobs)
    for blob, outcome in zip(blobs, outcomes):
        assert outcome.decoder == "cpu" and outcome.error is None
        assert np.array_equal(outcome.pixels, pillow_rgb(blob))


@pytest.mark.parametrize("bad_positions", [[0], [7], [2, 3], [0, 4, 7], list(range(8))])
def test_decoder__isolates_bad_images_wherever_they_sit_in_the_batch(bad_positions):
    decoder = ImageDecoder(max_batch_size=8, num_threads=2, device="cpu", fallback=False)
    blobs = [make_jpeg(i) for i in range(8)]
    for i in bad_positions:
        blobs[i] = _truncated_after_header(i)
    outcomes = decoder.decode(blobs)
    for i, outcome in enumerate(outcomes):
        if i in bad_positions:
            assert outcome.pixels is None and outcome.error.startswith("DALI")
        else:
            assert np.array_equal(outcome.pixels, pillow_rgb(blobs[i]))
    # The pipeline was rebuilt after the failures and still decodes.
    again = decoder.decode([make_jpeg(42)])
    assert again[0].decoder == "cpu"


def _truncated_after_header(seed: int) -> bytes:
    """A JPEG cut in the middle of its scan data: its header is whole, so it goes to DALI, which rejects it."""
    jpeg = make_jpeg(100 + seed, 200, 160)
    cut = jpeg[: len(jpeg) // 2]
    assert has_complete_header(cut)
    return cut


def test_decoder__bytes_without_a_complete_jpeg_header_never_reach_dali():
    decoder = ImageDecoder(max_batch_size=8, num_threads=2, device="cpu", fallback=False)
    jpeg = make_jpeg(1)
    scan = jpeg.index(b"\xff\xda")
    blobs = [b"\xff\xd8garbage", b"random bytes" * 50, jpeg[:scan + 6], jpeg[:200], jpeg]
    outcomes = decoder.decode(blobs)
    assert decoder.builds == 1, "a bad batch went to DALI and forced a rebuild"
    for outcome in outcomes[:4]:
        assert outcome.pixels is None and outcome.error.startswith("not for DALI: ")
    assert np.array_equal(outcomes[4].pixels, pillow_rgb(jpeg))


def test_decoder__outputs_of_earlier_runs_survive_later_runs():
    # The decoder hands out views of DALI's output buffers: they must not be reused by later runs.
    decoder = ImageDecoder(max_batch_size=4, num_threads=2, device="cpu")
    blobs = [make_jpeg(i, 30 + i % 5, 20) for i in range(24)]
    kept = []
    for start in range(0, 24, 4):
        kept.extend(decoder.decode(blobs[start : start + 4]))
    decoder.decode([make_jpeg(99, 35, 20)] * 4)  # one more run over the same shapes
    for blob, outcome in zip(blobs, kept):
        assert np.array_equal(outcome.pixels, pillow_rgb(blob))


def test_decoder__good_batches_build_the_pipeline_once(decoder):
    before = decoder.builds
    for _ in range(5):
        decoder.decode([make_jpeg(i) for i in range(8)])
    assert decoder.builds == before


def test_decoder__lists_longer_than_the_batch_are_decoded_in_chunks_in_order(decoder):
    blobs = [make_jpeg(i, 20 + i, 16) for i in range(19)]
    outcomes = decoder.decode(blobs)
    assert [o.pixels.shape[1] for o in outcomes] == [20 + i for i in range(19)]


def test_decoder__pillow_fallback_refuses_images_over_max_pixels():
    decoder = ImageDecoder(max_batch_size=2, num_threads=1, device="cpu", max_pixels=100)
    jpeg = make_jpeg(1, 40, 30)
    junk = jpeg[: jpeg.index(b"\xff\xdb")] + b"\x00\x01" + jpeg[jpeg.index(b"\xff\xdb") :]  # DALI rejects
    (outcome,) = decoder.decode([junk])
    assert outcome.pixels is None and "max_pixels=100" in outcome.error


def test_decoder__is_safe_to_share_between_threads(decoder):
    blobs = [make_jpeg(i) for i in range(6)]
    expected = [pillow_rgb(b) for b in blobs]
    errors = []

    def work():
        for _ in range(10):
            outs = decoder.decode(blobs)
            if not all(np.array_equal(o.pixels, e) for o, e in zip(outs, expected)):
                errors.append("mismatch")

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_decoder__bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="max_batch_size"):
        ImageDecoder(max_batch_size=0)
    with pytest.raises(ValueError, match="'tpu'"):
        resolve_device("tpu")


def test_resolve_device__auto_is_cpu_without_a_cuda_device_and_gpu_is_an_error():
    from beam_tarimg.decode import cuda_device_count

    if cuda_device_count():
        pytest.skip("a CUDA device is visible here; tests/test_gpu.py covers that path")
    assert resolve_device("auto") == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_device("gpu")


def test_jpeg_dimensions__agree_with_pillow_on_the_mix():
    from PIL import Image
    import io

    rng = np.random.default_rng(9)
    for i in range(20):
        blob = imagenet_like_jpeg(rng, i)
        assert jpeg_dimensions(blob) == Image.open(io.BytesIO(blob)).size


def test_jpeg_dimensions__none_for_non_jpeg_and_pillow_reads_other_formats():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (7, 5)).save(buf, "PNG")
    assert jpeg_dimensions(buf.getvalue()) is None
    assert image_dimensions(buf.getvalue()) == (7, 5)
    assert image_dimensions(b"nothing") is None
    assert jpeg_dimensions(b"\xff\xd8\xff\xda\x00\x02") is None  # a scan before any frame header


def test_decoder__a_broken_pipeline_is_freed_before_the_next_is_built():
    import gc
    import weakref

    built = []
    alive_at_build = []

    class Recording(DaliDecoder):
        def _build(self):
            gc.collect()
            alive_at_build.append(sum(1 for ref in built if ref() is not None))
            pipe = super()._build()
            built.append(weakref.ref(pipe))
            return pipe

    decoder = Recording(max_batch_size=16, num_threads=2, device="cpu", fallback=False)
    blobs = [make_jpeg(i) for i in range(16)]
    blobs[11] = _truncated_after_header(11)
    outcomes = decoder.decode(blobs)
    assert [o.pixels is None for o in outcomes].count(True) == 1
    assert decoder.builds > 2  # the halving rebuilt several times
    assert max(alive_at_build) == 0, alive_at_build


# -- orientation and the planned shape (issue 16) -------------------------------------------------------------


def _oriented_cases():
    base = make_jpeg(21, 40, 24)  # 40 wide, 24 high: a transposition shows in the shape
    exif, xmp, put = FP.exif_segment, FP.xmp_segment, FP.with_segments
    cases = {f"EXIF {k}": put(base, exif(k)) for k in range(1, 9)}
    cases.update({
        # Pillow reads the first of several EXIF segments (it joins them); DALI read the last, or crashed.
        "EXIF 6 then EXIF 3": put(base, exif(6), exif(3)),
        "EXIF 3 then EXIF 6": put(base, exif(3), exif(6)),
        "EXIF 8, big-endian, LONG, after other tags": put(base, exif(8, big_endian=True, typ=4, extra=3)),
        "XMP attribute 6": put(base, xmp(6, "attribute")),
        "XMP element 8": put(base, xmp(8, "element")),
        "XMP 5 then XMP 7 (the last counts)": put(base, xmp(5), xmp(7, "element")),
        "EXIF 1 wins over XMP 6": put(base, exif(1), xmp(6)),
        "EXIF without the tag, XMP 6": put(base, exif(None), xmp(6)),
        "EXIF orientation 9 (none)": put(base, exif(9)),
        "broken EXIF, XMP 6": put(base, FP.app1(b"Exif\0\0XX*\0\x08\0\0\0"), xmp(6)),
    })
    return cases


@pytest.mark.parametrize("isolation", ["process", "none"])
def test_decoder__orientation_is_pillows_exif_transpose_for_several_exif_segments_and_xmp(isolation):
    cases = _oriented_cases()
    decoder = ImageDecoder(max_batch_size=32, num_threads=2, device="cpu", isolation=isolation)
    outcomes = decoder.decode(list(cases.values()))
    for (name, blob), outcome in zip(cases.items(), outcomes):
        expected = pillow_rgb(blob)
        assert outcome.pixels is not None, (name, outcome.error)
        assert outcome.pixels.shape == expected.shape and np.array_equal(outcome.pixels, expected), name
        # All but the broken EXIF (which only Pillow can read as Pillow does) are DALI's.
        assert outcome.decoder == ("pillow" if name.startswith("broken") else "cpu"), (name, outcome)
    # With its own orientation handling on, DALI 2.4 segfaulted (3 of 3) on "EXIF 6 then EXIF 3".
    assert decoder.crashes == 0
    decoder.close()


def test_decoder__a_dali_image_whose_size_is_not_the_planned_one_is_decoded_by_pillow_never_cropped():
    from beam_tarimg.decode import Plan

    blob = make_jpeg(22, 40, 24)
    decoder = DaliDecoder(max_batch_size=4, num_threads=1, device="cpu")
    # A plan that disagrees with what DALI returns (as a header parse and DALI disagreeing would).
    (outcome,) = decoder.decode([blob], [Plan(None, 40, 24, 1)])
    assert outcome.decoder == "pillow" and np.array_equal(outcome.pixels, pillow_rgb(blob))
    (fails,) = DaliDecoder(max_batch_size=4, num_threads=1, device="cpu", fallback=False).decode(
        [blob], [Plan(None, 40, 24, 1)])
    assert fails.pixels is None and fails.error == (
        "DALI returned 24x40 (HxW) pixels where the header says 40x24")


def test_decoder__the_fuzz_generators_of_issue_16_decode_as_pillow_or_fail_as_limits():
    import random

    from bench import fuzz, mutate

    rng = random.Random(16)
    bases = [b.data for b in mutate.base_jpegs(16, count=12)]
    items = []
    for generator, _ in FP.GENERATORS:
        for base in {FP.orientation_segments: bases * 3, FP.cost_claim: bases}.get(generator, bases[:3]):
            try:
                items.append(generator(rng, base))
            except mutate.NotApplicable:
                pass
    decoder = ImageDecoder(max_batch_size=32, num_threads=2, device="cpu")
    outcomes = decoder.decode([data for _, data in items])
    violations = [v for (kind, data), o in zip(items, outcomes) for v in FP.check(kind, data, o, fuzz.pillow_rgb)]
    assert violations == []
    kinds = {kind for kind, _ in items}
    assert kinds == {"orientation_segments", "cost_claim", "restart_flood", "marker_flood"}
    decoder.close()
