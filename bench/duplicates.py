"""Near-duplicate groups against known groups: the fixed 0.95 of before against the calibrated
threshold, and both grouping rules, side by side.

    python -m bench.duplicates [--corpus sample|synthetic] [--pictures 48] [--full-model]

``sample``: the bundled corpus, 23 photographs each with 3 edited copies (23 true groups of
four). ``synthetic``: ``--pictures`` generated pictures (48), a quarter of them with 3 mild
copies each. The corpus is ingested with ``imgsim ingest``'s code (the 2-block test ViT at
112 px, or with ``--full-model`` the demo's ViT-S/14 at 224, both random weights), then
``near_duplicates`` is materialized once per row with its config, and its groups are scored by
B-cubed purity (share of an image's group that is its photograph and its copies) and
completeness (share of its photograph's copies in its group); an image in no group is a group
of one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from dagster import instance_for_test
from PIL import Image

from imgsim_assets.core.storage import DataLayout
from imgsim_assets.cli import print_table
from imgsim_assets.core import copies as cp
from imgsim_assets.core import duplicates
from imgsim_assets.core.sample_data import write_sample_corpus, write_synthetic_batch
from imgsim_assets.definitions import build_definitions
from imgsim_assets.ingest import ingest, run_job
from imgsim_assets.resources import EncoderResource, PreprocessResource
from imgsim_assets.settings import Settings

ROWS = [("0.95, connected (before)", 0.95, "connected"), ("0.95, representative", 0.95, "representative"),
        ("calibrated, connected", None, "connected"), ("calibrated, representative", None, "representative")]


def write_corpus(kind: str, data_dir: Path, pictures: int = 48) -> None:
    if kind == "sample":
        write_sample_corpus(data_dir)
        return
    originals = write_synthetic_batch(DataLayout(data_dir).images / "b1", pictures, seed=5)
    copies = DataLayout(data_dir).images / "b2"
    copies.mkdir(parents=True)
    for path in originals[: pictures // 4]:
        for family in ("jpeg", "resize", "blur"):
            data = cp.make_copy(Image.open(path), family, cp.copy_rng(1, 0, path.stem + family))
            (copies / f"{path.stem}_{family}.jpg").write_bytes(data)


def true_group(path: str, kind: str) -> str:
    """The photograph a file shows, from its name."""
    stem = Path(path).stem
    if kind == "sample":
        return stem.rsplit("_", 1)[0] if path.startswith("batch-0002/") else stem
    return stem.rsplit("_", 1)[0] if path.startswith("b2/") else stem


def score(table, files: list[str], kind: str) -> dict:
    group_of = {row[f"path_{side}"]: row["group"] for row in table.to_pylist() for side in "ab" if row["group"] >= 0}
    predicted = duplicates.group_labels(np.arange(len(files)), {i: group_of[f] for i, f in enumerate(files) if f in group_of})
    truth = np.unique([true_group(f, kind) for f in files], return_inverse=True)[1]
    purity, completeness = duplicates.bcubed(predicted, truth)
    sizes = np.bincount(predicted)
    return {"purity": purity, "completeness": completeness, "f1": duplicates.f1(purity, completeness),
            "groups": int((sizes > 1).sum()), "images_in_groups": int(sizes[sizes > 1].sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=["sample", "synthetic"], default="sample")
    parser.add_argument("--pictures", type=int, default=48, help="synthetic corpus: generated pictures")
    parser.add_argument("--full-model", action="store_true", help="ViT-S/14 at 224 (the demo's) instead of 2 blocks at 112")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp) / "data")
        write_corpus(args.corpus, settings.data_dir, args.pictures)
        encoder = EncoderResource(weights="random", device="cpu", **({} if args.full_model else {"depth": 2}))
        pre = PreprocessResource(workers=1, **({} if args.full_model else {"crop_size": 112, "resize_size": 128}))
        defs = build_definitions(settings, encoder=encoder, preprocessing=pre)
        (Path(tmp) / "home").mkdir()
        with instance_for_test(temp_dir=str(Path(tmp) / "home")) as instance:
            report = ingest(defs, instance, settings.images_dir, log=lambda m: None)
            assert report.ok, report.failed
            evaluation = json.loads((settings.assets_dir / "retrieval_eval.json").read_text())
            files = sorted(p.relative_to(settings.images_dir).as_posix() for p in settings.images_dir.rglob("*")
                           if p.suffix in (".png", ".jpg"))
            rows = []
            for name, threshold, rule in ROWS:
                config = {"grouping": rule, **({"threshold": threshold} if threshold is not None else {})}
                failed = run_job(instance, defs.resolve_job_def("analyze_index"),
                                 ops_config={"near_duplicates": {"config": config}})
                assert failed is None, failed
                table = pq.read_table(settings.assets_dir / "near_duplicates.parquet")
                used = threshold if threshold is not None else evaluation["threshold"]["value"]
                rows.append({"rule": name, "threshold": used, **score(table, files, args.corpus)})
    t = evaluation["threshold"]
    print(f"{args.corpus} corpus, {len(files)} images, {'ViT-S/14 224' if args.full_model else '2-block ViT 112'}, "
          f"RANDOM WEIGHTS; calibrated threshold {t['value']:.4f} (precision {t['precision']:.3f}, recall "
          f"{t['recall']:.3f}, target {'reached' if t['reached'] else 'not reached'}; held out: precision "
          f"{evaluation['held_out_precision']:.3f}, recall {evaluation['held_out_recall']:.3f}); evaluation chose "
          f"{evaluation['grouping']}")
    print_table(rows, ["rule", "threshold", "purity", "completeness", "f1", "groups", "images_in_groups"])


if __name__ == "__main__":
    main()
