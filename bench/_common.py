"""Shared bits of the benchmarks: realistic test photos, timing, and the ratio report."""

from __future__ import annotations

import io
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from imgsim_assets.core import sample_data

# Common camera resolutions: ~1.2 MP, 3 MP and a 12 MP phone photo.
PHOTO_SIZES = ((1280, 960), (2048, 1536), (4032, 3024))


def write_photos(folder: Path, per_size: int, sizes=PHOTO_SIZES, seed: int = 0, quality: int = 90) -> list[Path]:
    """JPEG photos at camera resolutions: scikit-image photographs upscaled, with sensor noise
    (so the files carry as much entropy as real photos) and a share stored rotated (EXIF 6)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pictures = [im.convert("RGB") for im in sample_data._skimage_pictures().values()]
    paths = []
    for w, h in sizes:
        for i in range(per_size):
            path = folder / f"photo_{w}x{h}_{i:03d}.jpg"
            paths.append(path)
            if path.exists():
                continue
            im = pictures[(i * 7 + w) % len(pictures)].resize((w, h), Image.BICUBIC)
            a = np.asarray(im, dtype=np.int16) + rng.normal(0, 4, (h, w, 3)).astype(np.int16)
            im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
            exif = Image.Exif()
            if i % 4 == 3:
                exif[0x0112] = 6
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=quality, exif=exif.tobytes())
            path.write_bytes(buf.getvalue())
    return paths


def best_of(repeats: int, fn: Callable[[], object]) -> tuple[float, object]:
    """Fastest wall time of ``repeats`` runs (and the last result)."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def median(values) -> float:
    return statistics.median(values)


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident memory (VmHWM) of a live process, in MB. Unlike ``ru_maxrss`` of
    children, it does not count what a forked child briefly shared with its parent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def header(title: str) -> None:
    print(f"\n== {title} ==  ({os.cpu_count()} CPUs)")


def ratio_line(what: str, ours: str, baseline: str, ratio: float, target: str | None = None, ok: bool = True) -> None:
    """``what: ours vs baseline -> ratio`` and, when there is a target, whether it is met."""
    verdict = "" if target is None else f" ({'meets' if ok else 'MISSES'} target {target})"
    print(f"{what}: {ours} vs {baseline} -> {ratio:.2f}x{verdict}")
