"""The encoder's backends side by side on this CPU: images/s, the share of the machine's fp32 peak,
and each one's fidelity and retrieval against PyTorch eager fp32.

    python -m bench.backends [--model dinov2_vits14] [--depth N] [--size 224] [--batches 1,32]
                             [--images 64] [--seconds 10] [--collection data/images]

Every figure goes through the product's :class:`core.encoder.Encoder` (``backend=``, ``dtype=``):
``Encoder.embed`` on pixels already decoded (decode excluded), and ``Encoder.embed_files`` on
JPEG files with the decode worker processes (decode included). The peak is a float32 matrix
product loop measured in the same run; the model's FLOPs per image are counted by
``torch.utils.flop_counter``. Fidelity: max abs difference and lowest cosine of the vectors
against eager fp32 on the same images. Retrieval: the copy-detection evaluation
(``core.comparison.compare``, as ``imgsim compare-encoders`` runs it) over ``--collection``'s
images, recall@1 and mAP, for every backend. Seeded random weights unless ``--weights``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench._common import header, ratio_line
from imgsim_assets.core import backends, comparison
from imgsim_assets.core import evaluation as ev
from imgsim_assets.core.encoder import Encoder, EncoderSpec
from imgsim_assets.core.images import Preprocess, image_id_from_sha256
from imgsim_assets.core.sample_data import write_synthetic_batch

FP32_GOAL, BF16_GOAL = 1.6, 2.5


def native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products natively (AVX-512 BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def peak_gflops(seconds: float = 3.0, n: int = 2048) -> float:
    """float32 GFLOP/s of a matrix product loop on this process's torch threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.mm(a, b)
        done += 1
    return 2 * n**3 * done / (time.perf_counter() - started) / 1e9


def flops_per_image(model: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.forward_features(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def images_per_second(encoder: Encoder, pixels: np.ndarray, batch: int, seconds: float) -> float:
    encoder.embed(pixels[:batch])  # built (exported, compiled) and warm
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or done < 2 * batch:
        start = (done % max(len(pixels) - batch + 1, 1))
        encoder.embed(pixels[start : start + batch])
        done += batch
    return done / (time.perf_counter() - started)


def files_per_second(encoder: Encoder, files: list[Path], root: Path, pre: Preprocess) -> float:
    started = time.perf_counter()
    count = sum(len(records) for records, _ in encoder.embed_files(files, pre, root))
    return count / (time.perf_counter() - started)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dinov2_vits14")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--images", type=int, default=64, help="pixels and JPEG files timed per backend")
    parser.add_argument("--seconds", type=float, default=10.0, help="per backend and batch size")
    parser.add_argument("--collection", default="data/images", help="images for the retrieval figures ('' skips)")
    parser.add_argument("--backends", default=",".join(backends.BACKENDS))
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    spec = EncoderSpec(model=args.model, weights=args.weights, depth=args.depth)
    kinds = [(name, "float32") for name in args.backends.split(",") if backends.available(name)]
    if native_bf16():
        kinds += [(name, "bfloat16") for name in ("torch", "openvino") if name in args.backends.split(",")
                  and backends.available(name)]

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (max(args.images, max(batches)), 3, args.size, args.size), dtype=np.uint8)
    reference = Encoder(spec, device="cpu")
    peak = peak_gflops()
    flops = flops_per_image(reference.model, args.size)
    header(f"encoder backends: {args.model}{f' ({args.depth} blocks)' if args.depth else ''} at {args.size}x"
           f"{args.size}, CPU, {torch.get_num_threads()} torch threads, {flops / 1e9:.2f} GFLOP an image, fp32 peak "
           f"{peak:.0f} GFLOP/s (matrix product loop), native bf16: {'yes' if native_bf16() else 'no'}")
    expected = reference.embed(pixels[: args.images])

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = write_synthetic_batch(root / "files", args.images, seed=1, size=(480, 640))
        pre = Preprocess(crop_size=args.size, resize_size=round(args.size * 256 / 224))
        rates: dict[tuple[str, str, int], float] = {}
        for name, dtype in kinds:
            encoder = Encoder(spec, device="cpu", dtype=dtype, backend=name)
            label = f"{name} {dtype}"
            built = time.perf_counter()
            vectors = encoder.embed(pixels[: args.images])
            first = time.perf_counter() - built
            cosine = float(np.min(np.sum(vectors * expected, axis=1)))
            fidelity = f"max abs diff {np.abs(vectors - expected).max():.1e}, lowest cosine {cosine:.6f}"
            for batch in batches:
                rates[name, dtype, batch] = images_per_second(encoder, pixels, batch, args.seconds)
            with_decode = files_per_second(encoder, files, root / "files", pre)
            print(f"  {label}: first call {first:.1f} s (export/compile/cache), {fidelity}; "
                  + "; ".join(f"batch {b}: {rates[name, dtype, b]:.1f} img/s "
                              f"({rates[name, dtype, b] * flops / 1e9 / peak:.0%} of peak)" for b in batches)
                  + f"; files with decoding, batch {encoder.batch_size}: {with_decode:.1f} img/s")
        for batch in batches:
            base = rates["torch", "float32", batch]
            for (name, dtype, b), rate in rates.items():
                if b != batch or (name, dtype) == ("torch", "float32"):
                    continue
                goal = BF16_GOAL if dtype == "bfloat16" else FP32_GOAL
                ratio_line(f"batch {batch}: {name} {dtype} / torch float32 (img/s)", f"{rate:.1f} img/s",
                           f"{base:.1f} img/s", rate / base, f">= {goal}x", rate / base >= goal)
        os.environ["XDG_CACHE_HOME"] = str(root / "fresh-cache")  # auto's first use: nothing exported yet
        auto = Encoder(spec, device="cpu", backend="auto")
        started = time.perf_counter()
        auto.embed(pixels[:1])
        print(f"  auto's first use (every backend exported, built and timed): {time.perf_counter() - started:.1f} s")
        print(f"  auto chooses: {auto.backend.name} (measured on a batch of {backends.AUTO_BATCH}: "
              + ", ".join(f"{n} {m.get('images_per_second', m.get('skipped'))}"
                          for n, m in auto.backend_choice["measured"].items()) + ")")
        if args.collection:
            retrieval(spec, kinds, Path(args.collection), root / "scratch")


def retrieval(spec: EncoderSpec, kinds, collection: Path, scratch: Path) -> None:
    """recall@1 and mAP of the copy-detection evaluation, per backend, on ``collection``'s images."""
    import hashlib

    files = sorted(p for p in collection.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not files:
        print(f"  retrieval: no images under {collection} (make demo builds the sample set)")
        return
    database = [ev.Source(image_id_from_sha256(hashlib.sha256(p.read_bytes()).hexdigest()), p, collection)
                for p in files]
    database = list({s.image_id: s for s in database}.values())
    sources = database[:: max(1, len(database) // 40)]
    option = comparison.parse_option("cls@224:pca")
    scratch.mkdir(parents=True, exist_ok=True)
    figures = {}
    for name, dtype in kinds:
        encoder = Encoder(spec, device="cpu", dtype=dtype, backend=name)
        [result] = comparison.compare([option], sources, database, encoder, pca_dim=min(64, len(database) - 1),
                                      scratch=scratch)
        figures[name, dtype] = result
        print(f"  retrieval, {name} {dtype}: recall@1 {result.recall_at_1:.3f}, mAP "
              f"{result.mean_average_precision:.3f} ({len(sources)} sources, {len(database)} images)")
    base = figures["torch", "float32"]
    worst = max(abs(r.recall_at_1 - base.recall_at_1) for r in figures.values())
    worst_map = max(abs(r.mean_average_precision - base.mean_average_precision) for r in figures.values())
    print(f"  retrieval: largest difference from torch float32: recall@1 {worst:.3f}, mAP {worst_map:.3f} "
          f"(goal <= 0.01: {'met' if max(worst, worst_map) <= 0.01 else 'missed'})")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
