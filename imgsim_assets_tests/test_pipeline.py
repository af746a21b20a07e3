"""The whole chain materialized with Dagster into a temp dir, with a 2-block ViT."""

import shutil

import pyarrow.parquet as pq
import pytest
from PIL import Image
from dagster import AssetKey, Definitions, instance_for_test

from imgsim_assets.core.sample_data import write_synthetic_batch
from imgsim_assets.core.search import embed_files, encoder_from_info, preprocess_from_info
from imgsim_assets.definitions import build_definitions
from imgsim_assets.ingest import ingest
from imgsim_assets.resources import EncoderResource, PreprocessResource
from imgsim_assets.settings import Settings


@pytest.fixture
def pipeline(tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    defs = build_definitions(
        settings,
        encoder=EncoderResource(weights="random", depth=2, batch_size=16, device="cpu"),
        preprocessing=PreprocessResource(crop_size=112, resize_size=128, workers=1),
    )
    (tmp_path / "dagster_home").mkdir()
    with instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        yield settings, defs, instance


def _latest_metadata(instance, asset, partition=None):
    from dagster import AssetRecordsFilter

    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[partition] if partition else None), limit=1
    ).records
    return records[0] if records else None


def _check(instance, name):
    from dagster import AssetCheckKey

    key = AssetCheckKey(AssetKey("faiss_index"), name)
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
    return record.event.asset_check_evaluation


def test_chain_then_incremental_batch(pipeline):
    settings, defs, instance = pipeline
    images = settings.images_dir
    write_synthetic_batch(images / "b1", 20, seed=1)
    write_synthetic_batch(images / "b2", 20, seed=2)
    messages = []

    report = ingest(defs, instance, images, log=messages.append)
    assert report.ok, report.failed
    assert (report.new_batches, report.embedded, report.trained, report.shards, report.merged, report.analyzed) == (
        ["b1", "b2"], ["b1", "b2"], True, ["b1", "b2"], True, True)

    index = defs.load_asset_value("faiss_index", instance=instance)
    assert index.num_vectors == 40
    meta = _latest_metadata(instance, "faiss_index").asset_materialization.metadata
    assert meta["num_vectors"].value == 40
    # 40 vectors: exact search, so held-out recall is perfect and the check passes.
    assert meta["factory"].value.endswith(",L2norm,Flat") and meta["recall_at_10"].value == pytest.approx(1.0)
    assert "data:image/png;base64," in meta["recall_curve_plot"].value
    assert _check(instance, "faiss_index_recall").passed
    assert index.info["encoder"]["weights_file"] == "random"
    template = _latest_metadata(instance, "index_template").asset_materialization.metadata
    assert (template["factory"].value, template["nlist"].value) == ("Flat", 1)
    pca_meta = _latest_metadata(instance, "pca_model").asset_materialization.metadata
    assert "data:image/png;base64," in pca_meta["explained_variance_plot"].value
    shard = _latest_metadata(instance, "faiss_index_shards", "b1").asset_materialization.metadata
    assert shard["drift"].value == pytest.approx(1.0, abs=0.5)
    clusters = defs.load_asset_value("image_clusters", instance=instance).to_pandas()
    assert len(clusters) == 40 and clusters.image_id.is_unique

    # Every vector names the encoder and preprocessing that made it.
    embeddings = defs.load_asset_value("image_embeddings", instance=instance, partition_key="b1").to_pandas()
    assert len(embeddings) == 20
    assert {c: embeddings[c].unique().tolist() for c in ("model", "weights", "pooling", "preprocess")} == {
        "model": ["dinov2_vits14 depth=2"], "weights": ["random"], "pooling": ["cls"], "preprocess": ["dinov2_eval 112x112"]}

    # An indexed file, searched as a query, finds itself first.
    query = images / "b1" / "img_001_0007.png"
    encoder = encoder_from_info(index.info, device="cpu")
    records, vectors = embed_files([query], encoder, preprocess_from_info(index.info))
    first = index.search(vectors, k=5)[0][0]
    assert (first.image_id, first.path, first.batch) == (records[0].image_id, "b1/img_001_0007.png", "b1")
    assert first.inner_product == pytest.approx(1.0, abs=1e-4)

    pca_before = _latest_metadata(instance, "pca_model").storage_id
    # A new batch: 10 new pictures, one exact copy of a b1 file, one file that is not an image.
    write_synthetic_batch(images / "b3", 10, seed=3)
    shutil.copy(query, images / "b3" / "copy_of_7.png")
    Image.open(query).resize((120, 90)).save(images / "b3" / "smaller_7.png")  # a near-duplicate
    (images / "b3" / "notes.jpg").write_text("this is not a jpeg")

    report = ingest(defs, instance, images, log=messages.append)
    assert report.ok, report.failed
    assert (report.new_batches, report.embedded, report.trained, report.shards, report.merged) == (
        ["b3"], ["b3"], False, ["b3"], True)
    assert _latest_metadata(instance, "pca_model").storage_id == pca_before  # nothing retrained

    index = defs.load_asset_value("faiss_index", instance=instance)
    assert index.num_vectors == 51  # the 10 new images and the smaller copy; the exact copy is indexed once
    pairs = defs.load_asset_value("near_duplicates", instance=instance).to_pandas()
    manifest = defs.load_asset_value("raw_images", instance=instance, partition_key="b3").to_pandas()
    assert len(manifest) == 13
    smaller = manifest.set_index("path").loc["b3/smaller_7.png", "image_id"]
    pair = pairs[(pairs.image_id_a == min(smaller, first.image_id)) & (pairs.image_id_b == max(smaller, first.image_id))]
    assert len(pair) == 1 and pair.similarity.iloc[0] >= 0.95
    assert set(pairs.path_a) | set(pairs.path_b) >= {"b1/img_001_0007.png", "b3/smaller_7.png"}
    rejected = manifest[manifest.status == "rejected"]
    assert rejected.path.tolist() == ["b3/notes.jpg"] and rejected.reason.tolist() == ["not_an_image"]
    copy_hits = index.search(vectors, k=1)[0]
    assert copy_hits[0].image_id == first.image_id and copy_hits[0].copies == 2

    # Nothing changed: nothing runs.
    report = ingest(defs, instance, images, log=messages.append)
    assert (report.embedded, report.shards, report.merged, report.trained) == ([], [], False, False)

    # A file added to a known batch re-embeds that batch only.
    write_synthetic_batch(images / "b2" / "late", 1, seed=9)
    report = ingest(defs, instance, images, log=messages.append)
    assert (report.embedded, report.shards, report.merged) == (["b2"], ["b2"], True)
    assert defs.load_asset_value("faiss_index", instance=instance).num_vectors == 52

    # An empty batch fails clearly and the others are untouched.
    (images / "b4").mkdir()
    report = ingest(defs, instance, images, log=messages.append)
    assert not report.ok and "contains no files" in report.failed["embed b4"]
    assert defs.load_asset_value("faiss_index", instance=instance).num_vectors == 52

    # Retraining refits PCA and centroids and rebuilds every shard.
    shutil.rmtree(images / "b4")
    report = ingest(defs, instance, images, retrain=True, log=messages.append)
    assert report.ok and report.trained and sorted(report.shards) == ["b1", "b2", "b3"]
    assert report.removed_batches == ["b4"]
    assert defs.load_asset_value("faiss_index", instance=instance).num_vectors == 52

    # The downstream job answers a folder of queries from the materialized index.
    result = defs.resolve_job_def("similar_images_job").execute_in_process(
        instance=instance,
        run_config={"ops": {"similar_images": {"config": {"query_dir": str(images / "b3"), "k": 3}}}},
    )
    assert result.success
    answers = pq.read_table(settings.assets_dir / "similar_images.parquet").to_pandas()
    top = answers[answers["rank"] == 1].set_index("query")
    assert top.loc["copy_of_7.png", "image_id"] == first.image_id
    assert answers[answers["query"] == "notes.jpg"]["rejected"].tolist() == ["not_an_image"]
    shown = _latest_metadata(instance, "similar_images").asset_materialization.metadata["queries_and_neighbours"]
    assert "data:image/png;base64," in shown.value


def test_recall_below_target_fails_the_check_and_blocks_downstream(pipeline):
    from dagster import AssetSelection, define_asset_job

    settings, defs, instance = pipeline
    write_synthetic_batch(settings.images_dir / "b1", 45, seed=4)
    report = ingest(defs, instance, settings.images_dir, log=lambda m: None)
    assert report.ok, report.failed
    near_duplicates_then = _latest_metadata(instance, "near_duplicates").storage_id

    # Ask the index for more than exact search can give: the blocking check must stop the run.
    job = define_asset_job("strict", selection=AssetSelection.assets("faiss_index", "near_duplicates"))
    strict = Definitions.merge(defs, Definitions(jobs=[job])).resolve_job_def("strict")
    result = strict.execute_in_process(
        instance=instance, raise_on_error=False,
        run_config={"ops": {"faiss_index": {"config": {"recall_target": 1.01}}}},
    )
    assert not result.success
    evaluation = _check(instance, "faiss_index_recall")
    assert not evaluation.passed and evaluation.metadata["target"].value == 1.01
    assert _latest_metadata(instance, "near_duplicates").storage_id == near_duplicates_then  # not rebuilt

    # The gate holds on every later ingest, not only in the run that evaluated it.
    for _ in range(2):
        again = ingest(defs, instance, settings.images_dir, log=lambda m: None)
        assert not again.ok and not again.merged and "< target 1.01" in again.failed["check faiss_index_recall"]
    assert _latest_metadata(instance, "near_duplicates").storage_id == near_duplicates_then


def test_too_many_clusters_fall_back_and_say_so(pipeline):
    settings, defs, instance = pipeline
    write_synthetic_batch(settings.images_dir / "b1", 30, seed=5)
    instance.add_dynamic_partitions("image_batches", ["b1"])
    assert defs.resolve_job_def("embed_batch").execute_in_process(instance=instance, partition_key="b1").success
    result = defs.resolve_job_def("train_index").execute_in_process(
        instance=instance, run_config={"ops": {"cluster_centroids": {"config": {"nlist": 64}}}}
    )
    assert result.success
    meta = _latest_metadata(instance, "cluster_centroids").asset_materialization.metadata
    assert meta["nlist"].value == 1 and "nlist 64 needs 2496 vectors, have 30" in meta["fallbacks"].value[0]


def test_automation_schedules_and_pools(pipeline):
    from dagster import build_schedule_context, evaluate_automation_conditions

    from imgsim_assets.schedules import retrain_index

    settings, defs, instance = pipeline
    images = settings.images_dir
    write_synthetic_batch(images / "b1", 40, seed=1)
    assert ingest(defs, instance, images, log=lambda m: None).ok
    baseline = evaluate_automation_conditions(defs=defs, instance=instance)

    # Nothing drifted: the weekly retrain skips.
    assert retrain_index(build_schedule_context(instance=instance)).skip_message.startswith("no batch drifted")

    # A new batch is embedded (what the sensor requests); automation asks for its shard only.
    write_synthetic_batch(images / "b2", 10, seed=2)
    instance.add_dynamic_partitions("image_batches", ["b2"])
    assert defs.resolve_job_def("embed_batch").execute_in_process(instance=instance, partition_key="b2").success
    after = evaluate_automation_conditions(defs=defs, instance=instance, cursor=baseline.cursor)
    assert after.get_requested_partitions(AssetKey("faiss_index_shards")) == {"b2"}
    for trained in ("pca_model", "cluster_centroids", "index_template"):
        assert after.get_num_requested(AssetKey(trained)) == 0

    # Drift above a (deliberately zero) threshold: the check warns and the schedule retrains.
    result = defs.resolve_job_def("merge_index").execute_in_process(
        instance=instance, run_config={"ops": {"faiss_index": {"config": {"drift_threshold": 0.0}}}})
    assert result.success and not _check(instance, "retraining_due").passed
    request = retrain_index(build_schedule_context(instance=instance))
    assert request.run_key.startswith("retrain-after-check-") and request.tags["imgsim/reason"] == "drift"

    # GPU steps share the one-slot pool.
    pools = {name: defs.get_assets_def(name).op.pool for name in ("image_embeddings", "cluster_centroids", "pca_model")}
    assert pools == {"image_embeddings": "gpu", "cluster_centroids": "gpu", "pca_model": None}


def test_non_finite_vectors_fail_the_batch_with_a_clear_error(pipeline, monkeypatch):
    import numpy as np

    from imgsim_assets.core.encoder import Encoder

    settings, defs, instance = pipeline
    write_synthetic_batch(settings.images_dir / "b1", 6, seed=3)
    embed = Encoder.embed

    def overflowing(self, pixels):  # what a float16 overflow looks like
        vectors = embed(self, pixels)
        vectors[1] = np.inf
        return vectors

    monkeypatch.setattr(Encoder, "embed", overflowing)
    report = ingest(defs, instance, settings.images_dir, log=lambda m: None)
    assert not report.ok and "1 image(s) gave non-finite vectors" in report.failed["embed b1"]
    assert "set the encoder's dtype to bfloat16 or float32" in report.failed["embed b1"]
    assert not (settings.assets_dir / "image_embeddings" / "b1.parquet").exists()
    (run,) = instance.get_runs()
    kinds = {e.dagster_event.event_type_value for e in instance.all_logs(run.run_id) if e.is_dagster_event}
    assert "STEP_FAILURE" in kinds and "STEP_UP_FOR_RETRY" not in kinds  # deterministic: not retried
