"""The preprocessing protocol: DINOv2 evaluation resize and crop, grid resize, patch-size checks."""

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

from imgsim_assets.core import images
from imgsim_assets.core.images import Preprocess, decode
from imgsim_assets_tests.pictures import photo, png


def test_eval_protocol_matches_torchvision_resize_center_crop():
    a = photo()
    pre = Preprocess(draft=False)
    rec = images.ImageRecord(path="x.png")
    out = decode(png(a), pre, rec)
    ref = transforms.Compose([transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
                              transforms.CenterCrop(224), transforms.PILToTensor()])(Image.fromarray(a))
    assert out.shape == (3, 224, 224) and out.dtype == np.uint8
    # Resampling only the cropped box uses the same filter and sample centres; float rounding
    # may move a handful of pixels by one level.
    diff = np.abs(out.astype(int) - ref.numpy().astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert (rec.status, rec.width, rec.height, rec.format) == ("ok", 400, 300, "PNG")


def test_grid_protocol_resizes_without_crop():
    out = decode(png(photo()), Preprocess(protocol="grid", grid_size=(70, 98)), images.ImageRecord(path="x"))
    assert out.shape == (3, 70, 98)


def test_sizes_must_be_multiples_of_the_patch():
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        Preprocess(crop_size=225)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        Preprocess(protocol="grid", grid_size=(100, 70))
