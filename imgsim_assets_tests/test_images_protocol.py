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


def test_a_box_is_four_numbers_in_order_and_at_least_eight_pixels_a_side():
    assert images.Box.parse("10,20.5,110, 220").coords == (10.0, 20.5, 110.0, 220.0)
    for text, message in [("1,2,3", "four numbers"), ("a,b,c,d", "four numbers"), ("", "four numbers"),
                          ("0,0,50,nan", "finite"), ("0,0,inf,50", "finite"), ("50,0,10,40", "x0 < x1"),
                          ("0,40,50,40", "y0 < y1"), ("0,0,7.5,100", "7.5x100 pixels")]:
        with pytest.raises(images.BadBox, match=message):
            images.Box.parse(text)
    box = images.Box.parse("-20,10,60,500")
    assert box.clip(400, 300).coords == (0.0, 10.0, 60.0, 300.0)  # cut at the edges it passes
    with pytest.raises(images.BadBox, match="lies outside the 400x300 image"):
        images.Box.parse("500,10,600,50").clip(400, 300)
    with pytest.raises(images.BadBox, match="leaves 5x290 pixels"):
        images.Box.parse("395,10,600,500").clip(400, 300)


def test_a_box_is_preprocessed_as_the_picture_cropped_to_it():
    a = photo(300, 400, seed=4)
    for pre in (Preprocess(draft=False, crop_size=112, resize_size=128), Preprocess(protocol="grid", grid_size=(70, 98))):
        record = images.ImageRecord(path="x.png")
        boxed = decode(png(a), pre, record, images.Box(30, 40, 230, 190))
        assert record.size == (400, 300)  # the picture's own size, not the box's
        np.testing.assert_array_equal(boxed, decode(png(a[40:190, 30:230]), pre, images.ImageRecord(path="y.png")))
    # Where the model's grid lies in the picture: 400×300 is resized to 170×128, of which the
    # 112×112 from (29, 8) is kept; in the picture's pixels that is ×400/170 and ×300/128.
    pre = Preprocess(crop_size=112, resize_size=128)
    assert images.source_box(400, 300, pre) == pytest.approx((29 * 400 / 170, 8 * 300 / 128, 141 * 400 / 170, 120 * 300 / 128))
    # A 200×150 box is resized the same way, at half the scale, from its corner.
    assert images.source_box(400, 300, pre, images.Box(30, 40, 230, 190)) == pytest.approx(
        (30 + 29 * 200 / 170, 40 + 8 * 150 / 128, 30 + 141 * 200 / 170, 40 + 120 * 150 / 128))
