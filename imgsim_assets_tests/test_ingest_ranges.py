"""``imgsim ingest`` runs adjacent batches of one job as one run over the range: each batch still
gets its own files and its own materialization metadata, the results are those of one run per
batch, and a batch that fails fails alone. The decode workers do not outlast the job that
decoded."""

import dataclasses
import importlib
import os

import numpy as np
import pyarrow.parquet as pq
from dagster import AssetKey, AssetRecordsFilter, RunsFilter, instance_for_test

from imgsim_assets.assets import folders
from imgsim_assets.core import images
from imgsim_assets.core.sample_data import write_synthetic_batch
from imgsim_assets.definitions import build_definitions
from imgsim_assets.ingest import ingest
from imgsim_assets.resources import EncoderResource, PreprocessResource
from imgsim_assets.settings import Settings
from imgsim_assets_tests.run_processes import tiny_definitions

STAGES = importlib.import_module("imgsim_assets.ingest.stages")
SIZES = {"b1": 3, "b2": 6, "b3": 4}
FILE_TIME_NS = 1_700_000_000_123_456_000


def _collection(root):
    data = root / "data"
    for i, (batch, n) in enumerate(SIZES.items()):
        write_synthetic_batch(data / "images" / batch, n, seed=i, size=(32, 32))
        for file in (data / "images" / batch).iterdir():  # the same files, to their mtime (the manifests record it)
            os.utime(file, ns=(FILE_TIME_NS, FILE_TIME_NS))
    (root / "home").mkdir()
    return data


def _runs_by_job(instance) -> dict[str, int]:
    counts: dict[str, int] = {}
    for run in instance.get_runs(RunsFilter()):
        counts[run.job_name] = counts.get(run.job_name, 0) + 1
    return counts


def _metadata(instance, asset: str, batch: str) -> dict:
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[batch]), limit=1).records
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def _ingest(root, log=None):
    data = _collection(root)
    messages = []
    with instance_for_test(temp_dir=str(root / "home")) as instance:
        report = ingest(tiny_definitions(data), instance, data / "images", log=messages.append)
        runs = _runs_by_job(instance)
        metadata = {b: {a: _metadata(instance, a, b) for a in ("raw_images", "cropped_tensors", "image_embeddings",
                                                                "faiss_index_shards")}
                    for b in SIZES if b in report.embedded}
    return data, report, runs, metadata, messages


def test_adjacent_batches_run_once_with_their_own_files_and_metadata_and_the_results_of_one_run_each(
        tmp_path, monkeypatch):
    data, report, runs, metadata, _ = _ingest(tmp_path / "ranged")
    assert report.ok and report.embedded == report.shards == list(SIZES)
    assert runs["embed_batch"] == 1 and runs["index_shard"] == 1  # three batches, one run each stage
    for batch, n in SIZES.items():
        assert metadata[batch]["raw_images"]["num_files"] == n
        assert metadata[batch]["raw_images"][folders.CONSUMED_KEY] == folders.folder_version(data / "images" / batch)
        assert metadata[batch]["image_embeddings"]["num_vectors"] == n
        assert metadata[batch]["faiss_index_shards"]["num_vectors"] == n
        assert pq.read_metadata(data / "assets" / "image_embeddings" / f"{batch}.parquet").num_rows == n

    # One run per batch, as before ranges.
    monkeypatch.setattr(STAGES, "STAGES", tuple(dataclasses.replace(s, batches_per_run=1) for s in STAGES.STAGES))
    single, single_report, single_runs, _, _ = _ingest(tmp_path / "single")
    assert single_report.ok and single_runs["embed_batch"] == single_runs["index_shard"] == len(SIZES)
    for batch in SIZES:
        for asset, suffix in (("image_embeddings", "parquet"), ("raw_images", "parquet")):
            ranged = pq.read_table(data / "assets" / asset / f"{batch}.{suffix}").to_pydict()
            alone = pq.read_table(single / "assets" / asset / f"{batch}.{suffix}").to_pydict()
            assert ranged == alone, (asset, batch)
        with np.load(data / "assets" / "faiss_index_shards" / f"{batch}.npz") as a, \
                np.load(single / "assets" / "faiss_index_shards" / f"{batch}.npz") as b:
            assert all(np.array_equal(a[k], b[k]) for k in ("ids", "lists", "codes"))
    for name in ("near_duplicates.parquet", "image_clusters.parquet"):
        assert pq.read_table(data / "assets" / name).equals(pq.read_table(single / "assets" / name))


def test_a_failing_batch_in_a_range_fails_alone(tmp_path, monkeypatch):
    listing = images.list_batch_files

    def unreadable_b2(folder, *args, **kwargs):
        if folder.name == "b2":
            raise PermissionError(f"cannot list {folder}")
        return listing(folder, *args, **kwargs)

    monkeypatch.setattr(images, "list_batch_files", unreadable_b2)
    _, report, runs, metadata, messages = _ingest(tmp_path)
    assert report.embedded == ["b1", "b3"] and set(metadata) == {"b1", "b3"}
    assert set(report.failed) == {"embed b2"}
    assert "cannot list" in report.failed["embed b2"]
    assert any("running its batches one by one" in m for m in messages)
    assert runs["embed_batch"] == 1 + len(SIZES)  # the range, then each batch on its own
    assert report.shards == ["b1", "b3"] and report.merged


def test_decode_workers_are_stopped_before_the_runs_of_later_jobs(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_synthetic_batch(data / "images" / "b1", 40, seed=0, size=(32, 32))  # more than one chunk of 16
    defs = build_definitions(
        Settings(data_dir=data), encoder=EncoderResource(weights="random", depth=1, batch_size=8, device="cpu"),
        preprocessing=PreprocessResource(crop_size=56, resize_size=64, workers=2))
    started = []
    decode_pool = images.pool.decode_pool
    monkeypatch.setattr(images.pool, "decode_pool", lambda workers=0: started.append(workers) or decode_pool(workers))
    pool_at_start = {}  # job → the decode pool as its run starts
    (tmp_path / "home").mkdir()
    with instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        report = ingest(defs, instance, data / "images",
                        log=lambda m: m.startswith("running ") and pool_at_start.setdefault(m.split()[1], images.pool._pool))
    assert report.ok and report.merged and set(started) == {2}  # embedding decoded in 2 worker processes
    assert {"train_index", "index_shard", "merge_index", "analyze_index"} <= set(pool_at_start)
    assert all(pool is None for job, pool in pool_at_start.items() if job != "embed_batch")
