"""The encoder's backends side by side on this CPU: images/s, the share of the machine's fp32 peak,
and each one's fidelity and retrieval against PyTorch eager fp32.

    python -m bench.backends [--model dinov2_vits14] [--depth N] [--size 224] [--batches 1,32]
                             [--images 64] [--seconds 10] [--rounds 5] [--collection data/images]

Every figure goes through the product's :class:`core.encoder.Encoder` (``backend=``, ``dtype=``):
``Encoder.embed`` on pixels already decoded (decode excluded), and ``Encoder.embed_files`` on
JPEG files with the decode worker processes (decode included). The speeds are taken in
``--rounds`` rounds in which every backend runs in turn, so that a machine whose speed drifts
(a VM's neighbours) slows all of them alike: a backend's figure is its median over the rounds,
its ratio the median of its ratios to eager fp32 within a round. The peak is a float32 matrix
product loop measured in the same run; the model's FLOPs per image are counted by
``torch.utils.flop_counter``. Fidelity: max abs difference and lowest cosine of the vectors
against eager fp32 on the same images. Retrieval: the copy-detection evaluation
(``core.comparison.compare``, as ``imgsim compare-encoders`` runs it) with every image of
``--collection`` as a source, recall@1 and mAP, for every backend.

Weights: ``--weights``, else the product's seeded random weights with every LayerScale at 1. Left
at its 1e-5 initialisation, LayerScale all but silences every block, so the vectors hardly depend
on the picture and any precision looks faithful; at 1 (the value the official constructor sets
before a checkpoint is loaded) every block shapes the vectors, as a trained model's do, which is
what reduced precision has to be judged on. The speeds do not depend on the weights.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench._common import header, median, ratio_line
from imgsim_assets.core import backends, comparison, dinov2
from imgsim_assets.core import evaluation as ev
from imgsim_assets.core.encoder import Encoder, EncoderSpec
from imgsim_assets.core.images import Preprocess, image_id_from_sha256
from imgsim_assets.core.sample_data import write_synthetic_batch

FP32_GOAL, BF16_GOAL = 1.6, 2.5


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
    parser.add_argument("--rounds", type=int, default=5, help="rounds every backend is timed in, in turn")
    parser.add_argument("--dtype", default="auto", help="the precision auto is asked for (auto: as the product)")
    parser.add_argument("--backends", default=",".join(backends.BACKENDS))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run(args, Path(tmp))


def run(args, root: Path) -> None:
    batches = [int(b) for b in args.batches.split(",")]
    weights = args.weights if args.weights != "random" else str(layer_scale_one(args.model, args.depth, root))
    spec = EncoderSpec(model=args.model, weights=weights, depth=args.depth)
    chosen = [name for name in args.backends.split(",") if backends.available(name)]
    kinds = [(name, "float32") for name in chosen]
    if backends.native_bf16():
        kinds += [(name, "bfloat16") for name in chosen if name != "onnxruntime"]

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (max(args.images, max(batches)), 3, args.size, args.size), dtype=np.uint8)
    reference = Encoder(spec, device="cpu")
    peak = peak_gflops()
    flops = flops_per_image(reference.model, args.size)
    header(f"encoder backends: {args.model}{f' ({args.depth} blocks)' if args.depth else ''} at {args.size}x"
           f"{args.size}, CPU, {torch.get_num_threads()} torch threads, {flops / 1e9:.2f} GFLOP an image, fp32 peak "
           f"{peak:.0f} GFLOP/s (matrix product loop), native bf16: {'yes' if backends.native_bf16() else 'no'}; "
           f"weights {Path(weights).name}")
    expected = reference.embed(pixels[: args.images])
    files = write_synthetic_batch(root / "files", args.images, seed=1, size=(480, 640))
    pre = Preprocess(crop_size=args.size, resize_size=round(args.size * 256 / 224))
    encoders: dict[tuple[str, str], Encoder] = {}
    for name, dtype in kinds:
        encoder = encoders[name, dtype] = Encoder(spec, device="cpu", dtype=dtype, backend=name)
        built = time.perf_counter()
        vectors = encoder.embed(pixels[: args.images])  # exported, compiled, warm
        first = time.perf_counter() - built
        cosine = float(np.min(np.sum(vectors * expected, axis=1)))
        with_decode = files_per_second(encoder, files, root / "files", pre)
        print(f"  {name} {dtype}: first call {first:.1f} s (export/compile/cache), max abs diff "
              f"{np.abs(vectors - expected).max():.1e}, lowest cosine {cosine:.6f}; files with decoding, "
              f"batch {encoder.batch_size}: {with_decode:.1f} img/s")
    for batch in batches:
        rounds = {kind: [] for kind in kinds}
        for _ in range(args.rounds):
            for kind, encoder in encoders.items():
                encoder.embed(pixels[:batch])  # this batch size's graph built, and warm
                rounds[kind].append(images_per_second(encoder, pixels, batch, args.seconds / args.rounds))
        print(f"  batch {batch}, median of {args.rounds} rounds: " + "; ".join(
            f"{name} {dtype} {median(r):.1f} img/s ({median(r) * flops / 1e9 / peak:.0%} of fp32 peak)"
            for (name, dtype), r in rounds.items()))
        base = rounds["torch", "float32"]
        for (name, dtype), rates in rounds.items():
            if (name, dtype) == ("torch", "float32"):
                continue
            goal = BF16_GOAL if dtype == "bfloat16" else FP32_GOAL
            ratio = median([rate / eager for rate, eager in zip(rates, base)])
            ratio_line(f"batch {batch}: {name} {dtype} / torch float32 (img/s)", f"{median(rates):.1f} img/s",
                       f"{median(base):.1f} img/s", ratio, f">= {goal}x", ratio >= goal)
    os.environ["XDG_CACHE_HOME"] = str(root / "fresh-cache")  # auto's first use: nothing exported yet
    auto = Encoder(spec, device="cpu", backend="auto", dtype=args.dtype)
    started = time.perf_counter()
    auto.embed(pixels[:1])
    print(f"  auto's first use (every backend exported, built and timed): {time.perf_counter() - started:.1f} s")
    print(f"  auto chooses: {auto.backend.name} {auto.backend_choice['dtype']} (measured on a batch of "
          f"{backends.AUTO_BATCH}: " + ", ".join(f"{n} {m.get('images_per_second', m.get('skipped'))}"
                                                 for n, m in auto.backend_choice["measured"].items()) + ")")
    if args.collection:
        retrieval(spec, kinds, Path(args.collection), root / "scratch")


def layer_scale_one(model: str, depth: int | None, folder: Path) -> Path:
    """The seeded random weights with every LayerScale at 1, as a checkpoint file."""
    state = dinov2.load_dinov2(model, "random", depth=depth).state_dict()
    for name, value in state.items():
        if name.endswith(".gamma"):
            state[name] = torch.ones_like(value)
    path = folder / f"{model}-random-layerscale-1.pth"
    torch.save(state, path)
    return path


def retrieval(spec: EncoderSpec, kinds, collection: Path, scratch: Path) -> None:
    """recall@1 and mAP of the copy-detection evaluation, per backend, on ``collection``'s images."""
    import hashlib

    files = sorted(p for p in collection.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not files:
        print(f"  retrieval: no images under {collection} (make demo builds the sample set)")
        return
    database = [ev.Source(image_id_from_sha256(hashlib.sha256(p.read_bytes()).hexdigest()), p, collection)
                for p in files]
    database = list({s.image_id: s for s in database}.values())  # each picture once
    option = comparison.parse_option("cls@224:pca")
    scratch.mkdir(parents=True, exist_ok=True)
    figures = {}
    print(f"  retrieval: weights {spec.weights}, every one of {len(database)} images a source of copies")
    for name, dtype in kinds:
        encoder = Encoder(spec, device="cpu", dtype=dtype, backend=name)
        [result] = comparison.compare([option], database, database, encoder, pca_dim=min(64, len(database) - 1),
                                      scratch=scratch)
        figures[name, dtype] = result
        print(f"  retrieval, {name} {dtype}: recall@1 {result.recall_at_1:.4f}, mAP "
              f"{result.mean_average_precision:.4f}")
    base = figures["torch", "float32"]
    worst = max(abs(r.recall_at_1 - base.recall_at_1) for r in figures.values())
    worst_map = max(abs(r.mean_average_precision - base.mean_average_precision) for r in figures.values())
    print(f"  retrieval: largest difference from torch float32: recall@1 {worst:.4f}, mAP {worst_map:.4f} "
          f"(goal <= 0.01: {'met' if max(worst, worst_map) <= 0.01 else 'missed'})")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
