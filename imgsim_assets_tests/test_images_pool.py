"""Decoding many files in worker processes."""

import numpy as np

from imgsim_assets.core import images
from imgsim_assets.core.images import Preprocess
from imgsim_assets_tests.pictures import photo, png


def test_parallel_decoding_keeps_order_and_results(tmp_path):
    paths = []
    for i in range(20):
        p = tmp_path / f"{i:02d}.png"
        p.write_bytes(png(photo(60, 80, seed=i)))
        paths.append(p)
    pre = Preprocess(crop_size=56, resize_size=64)
    inline = list(images.preprocess_files(paths, tmp_path, pre, workers=1))
    pooled = list(images.preprocess_files(paths, tmp_path, pre, workers=2, chunk=4))
    assert [r.path for r, _ in pooled] == [r.path for r, _ in inline]
    for (_, a), (_, b) in zip(inline, pooled):
        np.testing.assert_array_equal(a, b)
