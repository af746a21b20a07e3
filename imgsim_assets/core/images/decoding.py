"""Bytes → an upright RGB uint8 tensor with Pillow, and what each way a decode fails means:
EXIF orientation, modes to RGB, truncation, and the pixel limit against decompression bombs."""

from __future__ import annotations

import contextlib
import io
import math
import re
import struct
import warnings
import zlib
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from imgsim_assets.core.images.metadata import photo_metadata
from imgsim_assets.core.images.protocol import PATCH_SIZE, BadBox, Box, Preprocess, resize_and_crop
from imgsim_assets.core.images.reasons import (
    DECODE_ERROR, DECOMPRESSION_BOMB, EMPTY_FILE, NOT_AN_IMAGE, TOO_SMALL, TRUNCATED, UNSUPPORTED_MODE, Rejected,
)  # fmt: skip
from imgsim_assets.core.images.records import ImageRecord

ORIENTATION_TAG = 0x0112
# How to turn the stored pixels upright for each EXIF orientation (EXIF 2.3, tag 0x0112: where
# the stored 0th row and 0th column lie in the displayed picture). 1 and absent: as stored.
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,  # 0th row top, 0th column right: mirrored
    3: Image.Transpose.ROTATE_180,  # bottom, right
    4: Image.Transpose.FLIP_TOP_BOTTOM,  # bottom, left
    5: Image.Transpose.TRANSPOSE,  # left, top
    6: Image.Transpose.ROTATE_270,  # right, top: display rotates 90° clockwise
    7: Image.Transpose.TRANSVERSE,  # right, bottom
    8: Image.Transpose.ROTATE_90,  # left, bottom: display rotates 90° counter-clockwise
}

# Formats Pillow can open that are never decoded: Pillow renders EPS by running Ghostscript,
# an external PostScript interpreter, on the file (a program, not a picture).
EXCLUDED_FORMATS = frozenset({"EPS"})

# Transparent pixels are composited on this colour so that RGBA and RGB copies of the same
# picture land close together.
BACKGROUND = (255, 255, 255)

# What Pillow's readers raise for a corrupt file: OSError from the decoders, SyntaxError,
# struct.error and friends from the header parsers, zlib.error from a broken deflate stream.
_DECODER_ERRORS = (
    OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, EOFError,
    struct.error, zlib.error, ArithmeticError,
)  # fmt: skip
_BUFFER_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
_TRUNCATION = re.compile(r"truncated|broken data stream|premature end|unexpected end", re.IGNORECASE)


def decode(data: bytes, pre: Preprocess, record: ImageRecord, box: Box | None = None) -> np.ndarray | None:
    """:func:`decode_pixels` for callers that hold bytes rather than a file: a rejection goes
    into ``record`` and the result is None. Never raises for bad data (only :class:`BadBox`
    for a box that leaves too little of the picture)."""
    try:
        return decode_pixels(data, pre, record, box)
    except Rejected as e:
        record.reject(e)
        return None


def decode_pixels(data: bytes, pre: Preprocess, record: ImageRecord, box: Box | None = None) -> np.ndarray:
    """Decode and preprocess one image to uint8 ``3×H×W``, filling in ``record``'s format,
    size and remarks; raises :class:`Rejected` for every failure, each mapped to a reason.

    With ``box`` (pixels of the upright picture), only that region is preprocessed, as if the
    picture had been cropped to it first; a box reaching past an edge is cut there, and one
    that leaves less than ``MIN_BOX_SIDE`` pixels a side raises :class:`BadBox`. The limits
    are those of the whole picture: it is decoded whole."""
    if not data:
        raise Rejected(EMPTY_FILE, "file is empty")
    try:
        with warnings.catch_warnings(), _pixel_limit(pre.max_pixels):
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode(data, pre, record, box)
    except (Rejected, BadBox):
        raise
    except UnidentifiedImageError as e:
        # Pillow names the in-memory buffer, address included: drop it, messages stay stable.
        raise Rejected(NOT_AN_IMAGE, _BUFFER_REPR.sub("", str(e))) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected(DECOMPRESSION_BOMB, str(e)) from e
    except _DECODER_ERRORS as e:
        message = str(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        truncated = _TRUNCATION.search(message) or _cut_short(data)
        raise Rejected(TRUNCATED if truncated else DECODE_ERROR, message) from e
    except Exception as e:  # noqa: BLE001
        # Last resort: a decoder bug outside the errors above (MemoryError, an assertion in a
        # plugin) must cost one file, not the batch. The type name says what to map next.
        raise Rejected(DECODE_ERROR, f"unexpected {type(e).__name__}: {e}") from e


def _decode(data: bytes, pre: Preprocess, record: ImageRecord, box: Box | None) -> np.ndarray:
    im = Image.open(io.BytesIO(data), formats=_open_formats())
    record.format = im.format or ""
    width, height = im.size
    record.width, record.height = width, height
    if width * height > pre.max_pixels:
        raise Rejected(DECOMPRESSION_BOMB, f"{width}x{height} pixels exceeds the limit of {pre.max_pixels}")
    if im.format != "JPEG":  # before the EXIF is read: a PNG's may follow its pixels, and reading it decodes them
        _within_budget(im, pre, rotated=False)
    exif, exif_remark = _exif(im)  # the one parse of the EXIF block: orientation and photo metadata
    orientation, orientation_remark = _orientation(exif)
    exif_remark = exif_remark or orientation_remark
    record.describe(photo_metadata(exif, _exif_size(im)))
    transposed = orientation in (5, 6, 7, 8)
    # The manifest reports the size as displayed, i.e. after EXIF rotation.
    record.width, record.height = (height, width) if transposed else (width, height)
    if width < PATCH_SIZE or height < PATCH_SIZE:
        raise Rejected(TOO_SMALL, f"{width}x{height} is smaller than one {PATCH_SIZE}px patch")
    region = box.clip(*record.size) if box is not None else None  # before a pixel is decoded
    if pre.draft and im.format == "JPEG":
        # DCT-domain downscale: decodes at 1/2, 1/4 or 1/8 size, never below the resize
        # target. The target is for the upright image; draft works before the rotation.
        target_w, target_h = _draft_target(record.size, pre, region)
        im.draft("RGB", (target_h, target_w) if transposed else (target_w, target_h))
    crop_share = region.width * region.height / (record.width * record.height) if region is not None else 0.0
    _within_budget(im, pre, rotated=orientation != 1, crop_share=crop_share)  # after draft: what will really be decoded
    im.load()
    if orientation != 1 and _orientation(_exif(im)[0])[0] != orientation:
        # The reader rotated the pixels itself while loading and dropped the tag; it reported
        # the upright size from the start (recent Pillows' TIFF reader does).
        orientation = 1
        record.width, record.height = width, height
        region = box.clip(*record.size) if box is not None else None
    upright = im.transpose(UPRIGHT[orientation]) if orientation != 1 else im
    if region is not None:
        upright, region = _crop(upright, region.scaled(upright.width / record.width, upright.height / record.height))
    if _is_grey(upright):  # resized as one band, made RGB at the output size: the same pixels, a third of the memory
        picture = resize_and_crop(_to_l(upright), pre, region).convert("RGB")
    else:
        picture = resize_and_crop(_to_rgb(upright), pre, region)
    pixels = np.asarray(picture, dtype=np.uint8).transpose(2, 0, 1).copy()
    frames, frames_remark = _frame_count(im)
    if frames > 1:
        record.note(f"first of {frames} frames")
    for remark in (frames_remark, exif_remark):
        if remark:
            record.note(remark)
    return pixels


def _draft_target(size: tuple[int, int], pre: Preprocess, region: Box | None) -> tuple[int, int]:
    """The smallest size of the whole upright picture at which ``region`` (or all of it) still
    covers its resize target."""
    if region is None:
        return pre.resized_size(*size)
    target_w, target_h = pre.resized_size(region.width, region.height)
    scale = max(target_w / region.width, target_h / region.height)
    return (math.ceil(size[0] * scale), math.ceil(size[1] * scale))


def _crop(upright: Image.Image, region: Box) -> tuple[Image.Image, Box]:
    """The whole pixels that hold ``region``, cut out, and the region within them: resampling
    then sees nothing of the picture outside the box."""
    whole = (max(math.floor(region.x0), 0), max(math.floor(region.y0), 0),
             min(math.ceil(region.x1), upright.width), min(math.ceil(region.y1), upright.height))
    cut = upright if whole == (0, 0, upright.width, upright.height) else upright.crop(whole)
    # Clamped: a region scaled by a draft's ratio may overshoot the edge by a rounding error,
    # and Pillow refuses to resample from outside the picture.
    return cut, Box(max(region.x0 - whole[0], 0.0), max(region.y0 - whole[1], 0.0),
                    min(region.x1 - whole[0], cut.width), min(region.y1 - whole[1], cut.height))


def _within_budget(im: Image.Image, pre: Preprocess, rotated: bool, crop_share: float = 0.0) -> None:
    cost = decode_bytes(im.mode, *im.size, rotated=rotated, transparent="transparency" in im.info)
    if crop_share:  # the cut-out region is one more copy of part of the frame
        cost += math.ceil(crop_share * im.size[0] * im.size[1] + im.size[0] + im.size[1]) * _PIXEL_BYTES.get(im.mode, 4)
    if cost > pre.max_decode_bytes:
        raise Rejected(DECOMPRESSION_BOMB, f"decoding {im.size[0]}x{im.size[1]} {im.mode} takes about "
                       f"{cost / 2**20:,.0f} MiB, over the budget of {pre.max_decode_bytes / 2**20:,.0f} MiB")


def _open_formats() -> list[str]:
    """The formats :func:`decode` opens: all that Pillow knows but ``EXCLUDED_FORMATS``."""
    Image.init()
    return [f for f in Image.ID if f not in EXCLUDED_FORMATS]


def _exif(im: Image.Image) -> tuple[Image.Exif | None, str]:
    """The parsed EXIF block, or None and a remark when it is unusable."""
    try:
        return im.getexif(), ""
    except _DECODER_ERRORS as e:
        return None, f"EXIF ignored ({type(e).__name__}: {e})"


def _exif_size(im: Image.Image) -> int:
    """Bytes of the EXIF block as the file stores it (0 when it is the TIFF's own directory)."""
    raw = im.info.get("exif")
    return len(raw) if isinstance(raw, (bytes, bytearray)) else 0


def _orientation(exif: Image.Exif | None) -> tuple[int, str]:
    """The EXIF orientation, 1 to 8, and a remark when the tag is unusable (then the picture is
    used as stored, orientation 1)."""
    if exif is None:
        return 1, ""
    try:
        value = exif.get(ORIENTATION_TAG, 1)
    except _DECODER_ERRORS as e:
        return 1, f"EXIF ignored ({type(e).__name__}: {e})"
    if isinstance(value, int) and value in UPRIGHT:
        return value, ""
    return 1, "" if (isinstance(value, int) and value == 1) else f"EXIF orientation {value!r} ignored"


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("P", "L", "RGB") and "transparency" in im.info:
        # A palette entry's alpha or a colour key (PNG tRNS, GIF): transparent like alpha.
        im = im.convert("RGBA")
    if im.mode == "RGB":
        return im
    try:
        if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = im if im.mode == "RGBA" else im.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, BACKGROUND)
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return canvas
        return im.convert("RGB")
    except ValueError as e:  # Pillow: "conversion from X to Y not supported"
        raise Rejected(UNSUPPORTED_MODE, f"mode {im.mode}: {e}") from e


_GREY_MODES = ("1", "L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Bytes per pixel of a decoded frame as Pillow holds it (three bands are stored in four).
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}


def _is_grey(im: Image.Image) -> bool:
    return im.mode in _GREY_MODES and "transparency" not in im.info


def decode_bytes(mode: str, width: int, height: int, rotated: bool = False, transparent: bool = False) -> int:
    """Memory a decode takes at its peak, from the header alone: the frame as Pillow holds it
    (twice when EXIF rotates it), plus the copies the way to RGB makes: one band for greyscale
    (resized before it becomes RGB), RGBA and an RGB canvas for alpha, RGB for the rest."""
    frame = _PIXEL_BYTES.get(mode, 4)
    if mode in _GREY_MODES and not transparent:
        extra = 0 if mode == "L" else 1
    elif mode == "RGB" and not transparent:
        extra = 0
    elif mode in _ALPHA_MODES or mode == "P" or transparent:
        extra = 4 if mode == "RGBA" else 8
    else:
        extra = 4
    return width * height * (frame * (2 if rotated else 1) + extra)


def _to_l(im: Image.Image) -> Image.Image:
    """Greyscale of any depth as 8-bit ``L``."""
    if im.mode == "L":
        return im
    if im.mode == "1":
        return im.convert("L")
    return Image.fromarray(_to_8_bits(im), "L")


def _to_8_bits(im: Image.Image, rows: int = 256) -> np.ndarray:
    """16/32-bit and float greyscale scaled to uint8, not clipped: 16-bit data spans 0-65535,
    32-bit integers and floats are scaled by their maximum (floats in 0-1, the usual
    convention, by 1). A few rows at a time, in the data's own width: no float64 copy of the
    whole image (a 13,376² 16-bit PNG took 5 GB that way)."""
    width, height = im.size
    out = np.empty((height, width), np.uint8)

    def blocks():
        for r in range(0, height, rows):
            yield r, np.asarray(im.crop((0, r, width, min(r + rows, height))))

    if im.mode.startswith("I;16"):
        for r, block in blocks():  # round(x / 65535 · 255) = (x + 128) // 257, exactly
            out[r : r + len(block)] = (block.astype(np.uint32) + 128) // 257
        return out
    peak = max((float(np.nanmax(b)) for _, b in blocks() if not np.isnan(b).all()), default=0.0)
    top = 1.0 if im.mode == "F" and peak <= 1.0 else max(peak, 1.0)
    for r, block in blocks():
        scaled = block.astype(np.float32) * np.float32(255.0 / top) + np.float32(0.5)
        out[r : r + len(block)] = np.clip(np.nan_to_num(scaled), 0, 255)
    return out


def _frame_count(im: Image.Image) -> tuple[int, str]:
    """How many frames (pages) the file has, and a remark when that cannot be told.

    Asked after the first frame is decoded: counting seeks through the whole file, and a
    corrupt later frame must not cost the first one.
    """
    try:
        return int(getattr(im, "n_frames", 1)), ""
    except _DECODER_ERRORS as e:
        return 1, f"first frame; frame count unknown ({type(e).__name__}: {e})"


def _cut_short(data: bytes) -> bool:
    """Whether the file ends before its container says it does (asked after a decode error)."""
    if data[:4] == b"RIFF" and len(data) >= 8:  # WebP: the RIFF header holds the length
        return int.from_bytes(data[4:8], "little") + 8 > len(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return b"IEND" not in data[-12:]
    if data[:3] == b"GIF":
        return not data.endswith(b";")
    if data[:2] == b"\xff\xd8":  # JPEG: ends with EOI, sometimes padded with zeros
        return not data.rstrip(b"\0").endswith(b"\xff\xd9")
    return False


@contextlib.contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's own bomb limit (a module global) set to ``max_pixels`` for one decode, so
    that a limit above Pillow's default is honoured too."""
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous
