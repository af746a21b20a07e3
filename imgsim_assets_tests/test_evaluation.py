"""The copy-detection evaluation: scoring and calibration on known vectors, then the whole
asset on generated images, where every planted copy's source is known."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imgsim_assets.core import copies as cp
from imgsim_assets.core import duplicates
from imgsim_assets.core import evaluation as ev
from imgsim_assets.core.sample_data import write_synthetic_batch
from imgsim_assets.ingest import ingest, run_job
from imgsim_assets_tests.test_pipeline import _latest_metadata, pipeline  # noqa: F401  (fixture)


def test_precision_recall_and_the_lowest_threshold_reaching_the_target():
    positive = np.array([0.99, 0.95, 0.90, 0.80, 0.60])
    negatives = np.array([0.92, 0.70, 0.50, 0.40])
    t, p, r = ev.precision_recall(positive, negatives, len(positive))
    assert t.tolist() == sorted(np.concatenate((positive, negatives)).tolist(), reverse=True)
    assert p[:3].tolist() == [1.0, 1.0, pytest.approx(2 / 3)] and r[1] == pytest.approx(0.4)
    strict = ev.calibrate(positive, negatives, 0.99)
    assert strict == ev.Threshold(0.95, 1.0, 0.4, True)
    loose = ev.calibrate(positive, negatives, 0.75)  # 4 right of 5 at or above 0.80
    assert loose.value == 0.80 and loose.precision == pytest.approx(0.8) and loose.recall == pytest.approx(0.8)
    # No threshold reaches it: one just above every non-copy, and the recall that leaves.
    hopeless = ev.calibrate(np.array([0.5, 0.4]), np.array([0.9]), 0.99)
    assert not hopeless.reached and hopeless.value > 0.9 and hopeless.recall == 0.0


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_scores_label_sources_ties_and_the_collections_own_duplicates():
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=(50, 32)))
    ids = np.arange(100, 150)
    # Image 101 is an exact tie of 100 (another file of the same pixels); 102 a near copy of 100.
    base[1] = base[0]
    base[2] = _unit(base[[0]] + 0.05 * rng.normal(size=(1, 32)))[0]
    space = ev.FlatSpace(ids, base)
    sources = np.array([100, 110, 120])
    copies = np.repeat(sources, 4)
    noise = np.array([0.05, 0.1, 0.2, 3.0] * 3)[:, None]
    vectors = _unit(base[copies - 100] + noise * rng.normal(size=(12, 32)))
    scores = ev.score_copies(ev.CopySet(copies, np.array(["a", "b", "c", "d"] * 3, dtype=object), vectors), space, k=10)
    # Mild copies find their source (or its tie) first; the drowned copy (noise 3) does not.
    assert scores.rank.tolist()[:3] == [1, 1, 1] and scores.rank[3] != 1
    assert scores.rank.tolist()[4:7] == [1, 1, 1] and scores.rank.tolist()[8:11] == [1, 1, 1]
    # 101 (the tie) counts as right, 102 (as close to 100 as its copies) as neither.
    assert scores.unlabelled >= 1
    assert np.all(scores.average_precision[[0, 1, 2]] == 1.0)
    assert scores.positive[0] > scores.positive[3]


# Edit strengths of synthetic copies (noise norm relative to the unit vector): from a re-encode
# (0.1, cosine 0.995) to a combination of edits (1.2, cosine 0.64, as close as unrelated images).
EDITS = {"jpeg": 0.1, "resize": 0.2, "color": 0.35, "flip": 0.5, "blur": 0.6, "crop": 0.7, "combo": 1.0, "overlay": 1.2}


def _edited(rng, vectors, strength):
    return _unit(vectors + strength * rng.normal(size=vectors.shape) / np.sqrt(vectors.shape[-1]))


@pytest.mark.parametrize("seed", [0, 1])
def test_a_collection_that_already_holds_copies_gets_a_threshold_that_groups_them(seed):
    """A third of the pictures are in the collection two or three times (as mirrored, cropped,
    resized... copies); unrelated pictures of the same scene are as close as the strongest edits.
    The calibrated threshold and rule must recover the collection's own groups."""
    rng = np.random.default_rng(seed)
    dim, scenes, pictures = 64, 30, 600
    centres = _unit(rng.normal(size=(scenes, dim)))
    originals = _edited(rng, centres[rng.integers(0, scenes, pictures)], 0.9)  # same scene: cosine about 0.55
    vectors, truth = [originals], list(range(pictures))
    for p in rng.choice(pictures, pictures // 3, replace=False):
        for _ in range(rng.integers(2, 4)):
            vectors.append(_edited(rng, originals[[p]], rng.choice(list(EDITS.values())[:6])))
            truth.append(p)
    vectors, truth = np.concatenate(vectors), np.array(truth)
    ids = np.arange(len(vectors)) + 1000
    space = ev.FlatSpace(ids, vectors)

    sources = ev.sample_sources(ids, 200, seed)
    source = np.repeat(sources, len(EDITS))
    family = np.tile(np.array(list(EDITS), dtype=object), len(sources))
    planted = np.concatenate([_edited(rng, vectors[s - 1000][None], strength)
                              for s in sources for strength in EDITS.values()])
    report = ev.summarize(ev.score_copies(ev.CopySet(source, family, planted), space, k=100), 0.99, seed, {})
    assert report.threshold.reached and report.unlabelled > 0

    # The collection grouped as near_duplicates groups it.
    a, b, sims = ev._pairs_at_or_above(vectors, report.threshold.value)
    labels = duplicates.group_labels(np.arange(len(vectors)), duplicates.RULES[report.grouping](a, b, sims))
    purity, completeness = duplicates.bcubed(labels, truth)
    assert purity >= 0.95 and completeness >= 0.9, (report.threshold, purity, completeness)


def test_every_family_makes_a_decodable_jpeg_and_the_same_copy_each_time():
    rng = np.random.default_rng(1)
    picture = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    for family in cp.FAMILIES:
        data = cp.make_copy(picture, family, cp.copy_rng(0, 7, family))
        assert data[:2] == b"\xff\xd8" and data == cp.make_copy(picture, family, cp.copy_rng(0, 7, family))
        assert Image.open(__import__("io").BytesIO(data)).size[0] >= 8
    assert cp.make_copy(picture, "flip", cp.copy_rng(0, 7, "flip")) != cp.make_copy(picture, "jpeg", cp.copy_rng(0, 7, "jpeg"))
    with pytest.raises(ValueError, match="unknown copy family"):
        cp.make_copy(picture, "sepia", cp.copy_rng(0, 7, "sepia"))


def test_the_evaluation_finds_planted_copies_and_its_threshold_holds_on_held_out_pairs(pipeline):  # noqa: F811
    settings, defs, instance = pipeline
    write_synthetic_batch(settings.images_dir / "b1", 48, seed=5)
    report = ingest(defs, instance, settings.images_dir, log=lambda m: None)
    assert report.ok, report.failed
    assert report.evaluated and report.analyzed

    stored = json.loads((settings.assets_dir / "retrieval_eval.json").read_text())
    result = ev.CopyDetectionReport.from_dict(stored)
    assert result.sources == 48 and result.overall.copies == 48 * len(cp.FAMILIES) and not result.skipped
    by_family = {f.family: f for f in result.families}
    assert set(by_family) == set(cp.FAMILIES)
    # Pixel-preserving edits are found first, and overall far above chance (1/48).
    for family in ("jpeg", "resize", "blur"):
        assert by_family[family].recall_at_1 >= 0.9, by_family[family]
    assert result.overall.recall_at_10 >= 0.6 and result.overall.mean_average_precision >= 0.5
    # The threshold reaches the target on these pairs and close to it on sources it never saw.
    assert result.threshold.reached and result.threshold.precision >= result.target_precision
    assert result.held_out_precision >= 0.95 and result.held_out_recall > 0.2
    assert result.random_weights

    meta = _latest_metadata(instance, "retrieval_eval").asset_materialization.metadata
    assert meta["weights"].value.startswith("RANDOM WEIGHTS") and meta["duplicate_threshold"].value == result.threshold.value
    assert "family" in meta["table"].value and meta["by_family"].value.startswith("![by family](data:image/png")
    # The copies never entered the index, and their folder is gone.
    assert _latest_metadata(instance, "faiss_index").asset_materialization.metadata["num_vectors"].value == 48
    assert not [p for p in (settings.assets_dir / ".staging").iterdir() if "copies" in p.name]

    dups = _latest_metadata(instance, "near_duplicates").asset_materialization.metadata
    assert dups["threshold"].value == result.threshold.value
    assert dups["threshold_reason"].value.startswith("calibrated by retrieval_eval (RANDOM WEIGHTS): precision")
    assert dups["grouping"].value == result.grouping and "B-cubed" in dups["grouping_reason"].value

    # A batch of mild copies of twelve of them: near_duplicates recovers those groups, pure.
    originals = sorted((settings.images_dir / "b1").glob("*.png"))[:12]
    copies = settings.images_dir / "b2"
    copies.mkdir()
    for path in originals:
        for family in ("jpeg", "resize", "blur"):
            data = cp.make_copy(Image.open(path), family, cp.copy_rng(1, 0, path.stem + family))
            (copies / f"{path.stem}_{family}.jpg").write_bytes(data)
    report = ingest(defs, instance, settings.images_dir, log=lambda m: None)
    assert report.ok and report.analyzed and not report.evaluated  # the PCA stands: so does the threshold
    table = pq.read_table(settings.assets_dir / "near_duplicates.parquet")
    group_of = {row[f"path_{side}"]: row["group"] for row in table.to_pylist() for side in "ab" if row["group"] >= 0}
    files = sorted(p.relative_to(settings.images_dir).as_posix() for p in settings.images_dir.rglob("*.*")
                   if p.suffix in (".png", ".jpg"))
    truth = [Path(f).stem.rsplit("_", 1)[0] if f.startswith("b2/") else Path(f).stem for f in files]
    predicted = duplicates.group_labels(np.arange(len(files)), {i: group_of[f] for i, f in enumerate(files) if f in group_of})
    purity, completeness = duplicates.bcubed(predicted, np.unique(truth, return_inverse=True)[1])
    assert purity >= 0.95 and completeness >= 0.8, (purity, completeness)

    # Only the new batch was searched; a full search finds exactly the same pairs and groups.
    dups = _latest_metadata(instance, "near_duplicates").asset_materialization.metadata
    assert (dups["batches_searched"].value, dups["batches_reused"].value) == (1, 1)
    clusters = pq.read_table(settings.assets_dir / "image_clusters.parquet")
    assert _latest_metadata(instance, "image_clusters").asset_materialization.metadata["batches_reused"].value == 1
    assert run_job(instance, defs.resolve_job_def("analyze_index"),
                   ops_config={"near_duplicates": {"config": {"incremental": False}},
                               "image_clusters": {"config": {"incremental": False}}}) is None
    assert _latest_metadata(instance, "near_duplicates").asset_materialization.metadata["batches_searched"].value == 2
    full = pq.read_table(settings.assets_dir / "near_duplicates.parquet")
    assert full.to_pylist() == table.to_pylist() and table.num_rows > 0
    full_clusters = pq.read_table(settings.assets_dir / "image_clusters.parquet")
    assert full_clusters.to_pylist() == clusters.to_pylist() and clusters.num_rows == 48 + 36

    # A file added to an old batch: that batch is searched again, the other one reused.
    late = sorted((settings.images_dir / "b1").glob("*.png"))[20]
    (settings.images_dir / "b1" / "late_copy.jpg").write_bytes(
        cp.make_copy(Image.open(late), "blur", cp.copy_rng(2, 0, "late")))
    assert ingest(defs, instance, settings.images_dir, log=lambda m: None).ok
    dups = _latest_metadata(instance, "near_duplicates").asset_materialization.metadata
    assert (dups["batches_searched"].value, dups["batches_reused"].value) == (1, 1)
    assert _latest_metadata(instance, "image_clusters").asset_materialization.metadata["batches_reused"].value == 0
    incremental = pq.read_table(settings.assets_dir / "near_duplicates.parquet")
    assert "b1/late_copy.jpg" in set(incremental.column("path_b").to_pylist()) | set(incremental.column("path_a").to_pylist())
    assert run_job(instance, defs.resolve_job_def("analyze_index"),
                   ops_config={"near_duplicates": {"config": {"incremental": False}}}) is None
    assert pq.read_table(settings.assets_dir / "near_duplicates.parquet").to_pylist() == incremental.to_pylist()


def test_sources_that_cannot_be_read_are_skipped_with_the_reason_and_the_scratch_folder_goes(tmp_path):
    import os
    from types import SimpleNamespace

    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(np.full((40, 50, 3), 120, np.uint8)).save(root / "ok.png")
    os.mkfifo(root / "fifo.png")  # would block a plain read
    (tmp_path / "outside.png").write_bytes((root / "ok.png").read_bytes())
    (root / "link.png").symlink_to(tmp_path / "outside.png")  # leads out of the images folder
    sources = [ev.Source(1, root / "ok.png", root), ev.Source(2, root / "fifo.png", root),
               ev.Source(3, root / "link.png", root), ev.Source(4, root / "gone.png", root)]
    seen = []

    def embed(paths, folder):
        seen.extend(paths)
        return ([SimpleNamespace(path=os.path.relpath(p, folder), status="ok", reason="") for p in paths],
                np.ones((len(paths), 4), np.float32))

    scratch = tmp_path / "scratch"
    copyset = ev.embed_copies(sources, ["jpeg", "flip"], 0, embed, scratch)
    assert copyset.source.tolist() == [1, 1] and copyset.family.tolist() == ["jpeg", "flip"]
    assert [s for s, _ in copyset.skipped] == [2, 3, 4]
    assert all(reason.startswith("cannot open") for _, reason in copyset.skipped)
    assert len(seen) == 2 and list(scratch.iterdir()) == []
