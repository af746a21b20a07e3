"""Why two images match: their DINOv2 patch tokens side by side. Each patch of one image is
paired with the patch of the other that it resembles most (cosine of the unit patch tokens),
so a page can show which parts of each picture the other one shares, and where."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from imgsim_assets.core.images import PATCH_SIZE, Box, Preprocess, source_box


@dataclass(frozen=True)
class Picture:
    """One side of a comparison: its preprocessed pixels (uint8 3×H×W), the size of the
    upright picture they came from, and the box that was cut from it, if any."""

    pixels: np.ndarray
    size: tuple[int, int]  # (width, height) after EXIF rotation
    box: Box | None = None


@dataclass
class PatchGrid:
    """One image's patches, each with its best match in the other image."""

    rows: int
    cols: int
    similarity: np.ndarray  # rows×cols: cosine of each patch with its best match
    match: np.ndarray  # rows×cols: that match, as row * cols + col in the other image's grid
    crop: tuple[float, float, float, float]  # what the grid covers: x0, y0, x1, y1 in the upright picture
    size: tuple[int, int]  # the upright picture's (width, height)

    def to_dict(self) -> dict:
        x0, y0, x1, y1 = self.crop
        return {
            "rows": self.rows, "cols": self.cols, "patch_size": PATCH_SIZE,
            "width": self.size[0], "height": self.size[1],
            "crop": {"x0": round(x0, 3), "y0": round(y0, 3), "x1": round(x1, 3), "y1": round(y1, 3)},
            "similarity": np.round(self.similarity.astype(np.float64), 4).tolist(),
            "match": self.match.tolist(),
        }


@dataclass
class PatchComparison:
    a: PatchGrid
    b: PatchGrid
    inner_product: float  # of the two images' vectors in the searched space: what search ranks by

    def to_dict(self) -> dict:
        return {"a": self.a.to_dict(), "b": self.b.to_dict(), "inner_product": round(self.inner_product, 6),
                "score": round((self.inner_product + 1.0) / 2.0, 6)}


def best_matches(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unit patch tokens ``a`` (Na×D) and ``b`` (Nb×D) → for each patch of ``a`` the cosine of
    its best match in ``b`` and that match's index, then the same for each patch of ``b``."""
    cosines = a @ b.T
    to_b, to_a = cosines.argmax(axis=1), cosines.argmax(axis=0)
    return cosines[np.arange(len(a)), to_b], to_b, cosines[to_a, np.arange(len(b))], to_a


def compare(encoder, pre: Preprocess, first: Picture, second: Picture,
            to_searched_space: Callable[[np.ndarray], np.ndarray] | None = None) -> PatchComparison:
    """Both pictures through ``encoder`` in one call, and each patch's best match in the other.
    ``to_searched_space`` maps raw embeddings to the space search scores in (the index's PCA);
    without it the raw embeddings are compared."""
    vectors, tokens = encoder.embed_with_patches(np.stack([first.pixels, second.pixels]))
    if to_searched_space is not None:
        vectors = to_searched_space(vectors)
    sim_a, match_a, sim_b, match_b = best_matches(tokens[0], tokens[1])
    rows, cols = first.pixels.shape[1] // PATCH_SIZE, first.pixels.shape[2] // PATCH_SIZE
    grids = []
    for picture, similarity, match in ((first, sim_a, match_a), (second, sim_b, match_b)):
        grids.append(PatchGrid(rows, cols, similarity.reshape(rows, cols), match.reshape(rows, cols),
                               source_box(*picture.size, pre, picture.box), tuple(picture.size)))
    return PatchComparison(grids[0], grids[1], float(np.dot(vectors[0], vectors[1])))
