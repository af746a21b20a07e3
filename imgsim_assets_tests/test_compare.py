"""Why two images match: patch tokens paired across two pictures by the 2-block random-weight ViT."""

import numpy as np
import pytest
import skimage.data

from imgsim_assets.core import compare
from imgsim_assets.core.encoder import Encoder, EncoderSpec
from imgsim_assets.core.images import Box, Preprocess

PRE = Preprocess(crop_size=112, resize_size=128)


@pytest.fixture(scope="module")
def encoder():
    return Encoder(EncoderSpec(weights="random", depth=2), device="cpu")


def _photo(name: str, side: int = 140) -> np.ndarray:
    """A sample photograph as uint8 3×side×side (bicubic from its 512 px original)."""
    from PIL import Image

    picture = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((side, side))
    return np.asarray(picture).transpose(2, 0, 1)


def test_best_matches_pair_each_patch_with_its_most_similar_one_both_ways():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
    b = np.array([[0.0, 1.0], [0.8, 0.6]], np.float32)
    sim_a, to_b, sim_b, to_a = compare.best_matches(a, b)
    np.testing.assert_allclose(sim_a, [0.8, 1.0, 0.96], atol=1e-6)
    assert to_b.tolist() == [1, 0, 1] and to_a.tolist() == [1, 2]
    np.testing.assert_allclose(sim_b, [1.0, 0.96], atol=1e-6)


def test_a_picture_matches_itself_patch_for_patch(encoder):
    pixels = _photo("astronaut", 112)
    picture = compare.Picture(pixels, (512, 512))
    result = compare.compare(encoder, PRE, picture, picture)
    for grid in (result.a, result.b):
        assert (grid.rows, grid.cols) == (8, 8)
        np.testing.assert_allclose(grid.similarity, 1.0, atol=1e-4)
        assert grid.match.ravel().tolist() == list(range(64))
        # 512² is resized to 128² and its central 112² kept: 32 px of the original on each side.
        assert grid.crop == pytest.approx((32, 32, 480, 480))
    assert result.inner_product == pytest.approx(1.0, abs=1e-5)
    answer = result.to_dict()
    assert answer["a"]["crop"] == {"x0": 32.0, "y0": 32.0, "x1": 480.0, "y1": 480.0}
    assert len(answer["a"]["similarity"]) == 8 and len(answer["a"]["similarity"][0]) == 8


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_a_copy_shifted_by_one_patch_matches_each_patch_to_its_shifted_self(encoder, name):
    big = _photo(name)  # 140 px: room for two 112-px views one patch (14 px) apart
    first, second = big[:, :112, :112], big[:, 14:126, 14:126]
    result = compare.compare(encoder, PRE, compare.Picture(first, (112, 112)),
                             compare.Picture(second, (112, 112)))
    rows, cols = np.divmod(np.arange(64), 8)
    in_both = (rows >= 1) & (cols >= 1)  # patch (r, c) of the first is patch (r-1, c-1) of the second
    matched = result.a.match.ravel()[in_both] == ((rows - 1) * 8 + cols - 1)[in_both]
    assert matched.mean() >= 0.9, matched.mean()
    # Shared patches match closely; the first's outer row and column exist only in it.
    assert result.a.similarity.ravel()[in_both].mean() > result.a.similarity.ravel()[~in_both].mean()
    noise = np.random.default_rng(0).integers(0, 256, first.shape, dtype=np.uint8)
    unrelated = compare.compare(encoder, PRE, compare.Picture(first, (112, 112)),
                                compare.Picture(noise, (112, 112)))
    assert unrelated.a.similarity.mean() < result.a.similarity.mean() - 0.3


def test_the_grid_of_a_box_lies_inside_the_box(encoder):
    pixels = _photo("coffee", 112)
    box = Box(100, 50, 300, 250)
    grid = compare.compare(encoder, PRE, compare.Picture(pixels, (400, 300), box), compare.Picture(pixels, (112, 112))).a
    # A 200² box: resized to 128², its central 112² kept, 200/128 px of the picture a pixel.
    assert grid.crop == pytest.approx((100 + 8 * 200 / 128, 50 + 8 * 200 / 128, 100 + 120 * 200 / 128, 50 + 120 * 200 / 128))
    assert grid.size == (400, 300)
