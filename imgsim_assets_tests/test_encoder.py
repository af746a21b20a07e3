import threading

import numpy as np
import pytest
from PIL import Image

from imgsim_assets.core import images
from imgsim_assets.core.encoder import Encoder, EncoderSpec, prefetch
from imgsim_assets.core.images import Preprocess

TINY = EncoderSpec(model="dinov2_vits14", weights="random", depth=1)
PRE = Preprocess(crop_size=56, resize_size=64)


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 56, 56), dtype=np.uint8)


def test_prefetch_keeps_order_and_reraises_in_the_consumer():
    assert list(prefetch(iter(range(100)), depth=3)) == list(range(100))

    def failing():
        yield 1
        raise KeyError("broken source")

    got = []
    with pytest.raises(KeyError, match="broken source"):
        for item in prefetch(failing()):
            got.append(item)
    assert got == [1]


def test_prefetch_stops_and_closes_its_source_when_abandoned():
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    stream = prefetch(endless(), depth=2)
    assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
    stream.close()
    assert closed.wait(5)
    assert not any(t.name == "imgsim-prefetch" for t in threading.enumerate())


def test_embed_batches_streams_the_same_vectors_as_one_call():
    encoder = Encoder(TINY, device="cpu", batch_size=4)
    pixels = _pixels(10)
    whole = encoder.embed(pixels)
    batches = [(np.arange(i, min(i + 4, 10)), pixels[i : i + 4]) for i in range(0, 10, 4)]
    seen = []
    out = list(encoder.embed_batches(batches, progress=lambda done, s: seen.append(done)))
    np.testing.assert_array_equal(np.concatenate([ids for ids, _ in out]), np.arange(10))
    np.testing.assert_allclose(np.concatenate([v for _, v in out]), whole, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1.0, atol=1e-5)
    assert seen == [4, 8, 10]


def test_embed_batches_rejects_pixels_that_are_not_uint8_images():
    encoder = Encoder(TINY, device="cpu")
    with pytest.raises(ValueError, match=r"expected uint8 N×3×H×W pixels, got torch.float32"):
        list(encoder.embed_batches([(np.arange(2), np.zeros((2, 3, 56, 56), np.float32))]))


@pytest.mark.parametrize("workers", [1, 2])
def test_embed_files_accounts_for_every_file_and_matches_the_two_step_path(tmp_path, workers):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(37):
        p = tmp_path / f"{i:02d}.png"
        if i % 9 == 4:
            p.write_bytes(b"<html>not an image</html>")
        else:
            Image.fromarray(rng.integers(0, 256, (70 + i, 90, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    encoder = Encoder(TINY, device="cpu", batch_size=8)

    out = list(encoder.embed_files(paths, PRE, tmp_path, workers=workers))
    records = [r for batch, _ in out for r in batch]
    vectors = np.concatenate([v for _, v in out])
    assert [r.path for r in records] == [p.name for p in paths]
    ok = [r for r in records if r.status == images.OK]
    assert {r.reason for r in records if r.status == images.REJECTED} == {images.NOT_AN_IMAGE}
    assert len(ok) == 33 and vectors.shape == (33, 384)
    assert all(len(v) <= 8 for _, v in out)

    expected = encoder.embed(np.stack([images.preprocess_file(tmp_path / r.path, tmp_path, PRE)[1] for r in ok]))
    np.testing.assert_allclose(vectors, expected, atol=1e-5)


def test_compiled_encoder_gives_the_same_vectors():
    pixels = _pixels(3, seed=1)
    eager = Encoder(TINY, device="cpu").embed(pixels)
    compiled = Encoder(TINY, device="cpu", compile=True).embed(pixels)
    np.testing.assert_allclose(compiled, eager, atol=1e-4)


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        Encoder(TINY, device="cpu", batch_size=0)
