"""Small pictures and files made in the tests (no binaries are committed), and a guard for
the calls that could block on one of them."""

import io
import struct
import threading
import zlib

import numpy as np
from PIL import Image


def photo(h: int = 300, w: int = 400, seed: int = 0) -> np.ndarray:
    """An h×w×3 uint8 picture: colour gradients plus seeded noise (distinct bytes per seed)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) % 256)], axis=-1).astype(np.uint8)
    return np.clip(a + rng.integers(0, 20, a.shape), 0, 255).astype(np.uint8)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    """``im`` saved in ``fmt``, as bytes."""
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png(a: np.ndarray, mode: str | None = None) -> bytes:
    """The array ``a`` as a PNG file."""
    return encode(Image.fromarray(a, mode), "PNG")


def jpeg(im: Image.Image, **kw) -> bytes:
    """``im`` as a JPEG file of quality 95."""
    return encode(im, "JPEG", quality=95, **kw)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG of a few dozen bytes whose header claims ``width``×``height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def within(seconds: float, fn, *args):
    """``fn(*args)``, failing (instead of hanging the suite) when it blocks for ``seconds``."""
    result = []
    worker = threading.Thread(target=lambda: result.append(fn(*args)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{fn.__name__} blocked for more than {seconds}s"
    return result[0]
