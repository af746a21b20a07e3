"""The recall gate on a duplicate-heavy folder: ties are not misses, an exact index measures
exact in its metadata and at its gate alike, a starved IVF still fails."""

import io

import numpy as np
from PIL import Image, PngImagePlugin

from imgsim_assets.core.sample_data import write_synthetic_batch
from imgsim_assets.ingest import ingest
from imgsim_assets_tests.test_pipeline import _check, _latest_metadata, pipeline  # noqa: F401  (fixture)


def write_copies(folder, n: int = 50, seed: int = 7) -> int:
    """``n`` byte-different files of one picture: lossless formats and PNG settings (the same
    pixels, so the same vector: exact ties) and a few high-quality JPEG re-encodes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    picture = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((128, 96), Image.BICUBIC)
    encodings = [("png", {"compress_level": level}) for level in range(10)]
    encodings += [("png", {"optimize": True}), ("bmp", {}), ("tiff", {}), ("tiff", {"compression": "tiff_lzw"}),
                  ("webp", {"lossless": True}), ("ppm", {})]
    encodings += [("jpg", {"quality": q}) for q in (95, 96, 97, 98)]
    written = set()
    for i in range(n):
        ext, options = encodings[i] if i < len(encodings) else ("png", {})
        if ext == "png":  # same pixels, other bytes: a text chunk naming the copy
            info = PngImagePlugin.PngInfo()
            info.add_text("copy", str(i))
            options = {**options, "pnginfo": info}
        buf = io.BytesIO()
        picture.save(buf, format={"jpg": "JPEG", "tiff": "TIFF", "ppm": "PPM"}.get(ext, ext.upper()), **options)
        data = buf.getvalue()
        assert data not in written
        written.add(data)
        (folder / f"copy_{i:02d}.{ext}").write_bytes(data)
    return len(written)


def _asset_and_gate_figures(instance) -> tuple[tuple, tuple]:
    """(recall@10, 1-recall@1) as the faiss_index materialization and its recall gate report them."""
    meta = _latest_metadata(instance, "faiss_index").asset_materialization.metadata
    gate = _check(instance, "faiss_index_recall").metadata
    return ((meta["recall_at_10"].value, meta["one_recall_at_1"].value),
            (gate["recall_at_10"].value, gate["one_recall_at_1"].value))


def test_copies_of_one_picture_pass_the_gate_a_starved_ivf_fails_it(pipeline):  # noqa: F811
    settings, defs, instance = pipeline
    batch = settings.images_dir / "dups"
    write_synthetic_batch(batch, 40, seed=21)
    assert write_copies(batch) == 50

    # Exact search (Flat): exact in the metadata and at the gate.
    report = ingest(defs, instance, settings.images_dir, log=lambda m: None)
    assert report.ok, report.failed
    meta = _latest_metadata(instance, "faiss_index").asset_materialization.metadata
    assert meta["factory"].value.endswith(",L2norm,Flat") and meta["num_vectors"].value == 90
    assert _asset_and_gate_figures(instance) == ((1.0, 1.0), (1.0, 1.0))
    assert 0.0 < meta["pca_recall_at_10"].value <= 1.0 and meta["tie_epsilon"].value == 1e-4
    assert _check(instance, "faiss_index_recall").passed
    assert _check(instance, "pca_loss") is not None

    # Two inverted lists, both probed: exact again, through the IVF.
    trained = defs.resolve_job_def("train_index").execute_in_process(
        instance=instance, run_config={"ops": {"cluster_centroids": {"config": {"nlist": 2}},
                                               "index_template": {"config": {"exact_max": 0}}}})
    assert trained.success
    assert defs.resolve_job_def("index_shard").execute_in_process(instance=instance, partition_key="dups").success
    merged = defs.resolve_job_def("merge_index").execute_in_process(
        instance=instance, run_config={"ops": {"faiss_index": {"config": {"nprobe": 2}}}})
    assert merged.success
    meta = _latest_metadata(instance, "faiss_index").asset_materialization.metadata
    assert meta["factory"].value.endswith(",L2norm,IVF2,Flat") and meta["nprobe"].value == 2
    assert _asset_and_gate_figures(instance) == ((1.0, 1.0), (1.0, 1.0))

    # One of the two probed: neighbours in the other list are missed, ties or not.
    merged = defs.resolve_job_def("merge_index").execute_in_process(
        instance=instance, raise_on_error=False, run_config={"ops": {"faiss_index": {"config": {"nprobe": 1}}}})
    assert not merged.success  # the blocking check failed the run
    meta = _latest_metadata(instance, "faiss_index").asset_materialization.metadata
    assert meta["factory"].value.endswith(",L2norm,IVF2,Flat") and meta["nprobe"].value == 1
    gate = _check(instance, "faiss_index_recall")
    assert not gate.passed and gate.metadata["recall_at_10"].value < 0.95
    assert "raise nprobe or rebuild" in gate.description

    # The verdict stands until the index changes: every ingest says so and fails.
    for _ in range(2):
        report = ingest(defs, instance, settings.images_dir, log=lambda m: None)
        assert not report.ok and not report.merged
        assert "faiss_index_recall" in " ".join(report.failed) and "recall@10 0." in " ".join(report.failed.values())
