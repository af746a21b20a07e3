"""``ingest``'s stages on a real instance and real folders, without running a model: the event
log of a complete ingest is written directly, then folders, materializations and the asset graph
change and the plan must follow."""

import pytest
from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetKey,
    AssetMaterialization,
    AssetRecordsFilter,
    Definitions,
    asset,
    define_asset_job,
    instance_for_test,
    multi_asset,
)
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)

from imgsim_assets.assets import folders
from imgsim_assets.core.sample_data import write_synthetic_batch
from imgsim_assets.ingest import STAGES, IngestReport, Stage, failed_checks, ingest, observe_folders, plan, run_stages
from imgsim_assets.policies import TRAINED
from imgsim_assets_tests.run_processes import tiny_definitions

BATCHES = ["b1", "b2"]
FULL_PLAN = ["embed b1", "embed b2", "train index", "shard b1", "shard b2", "merge index", "evaluate index",
             "analyze index"]


@pytest.fixture
def world(tmp_path):
    """Tiny definitions, two batch folders, and an instance where they are registered and observed."""
    data = tmp_path / "data"
    for i, batch in enumerate(BATCHES):
        write_synthetic_batch(data / "images" / batch, 3, seed=i, size=(32, 32))
    (tmp_path / "home").mkdir()
    with instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        observe_folders(instance, data / "images", log=lambda m: None)
        yield tiny_definitions(data), instance, data / "images"


def _labels(steps):
    return [s.label for s in steps]


def _materialize(instance, key: str, partition=None, **metadata):
    instance.report_runless_asset_event(AssetMaterialization(key, partition=partition, metadata=metadata))


def _complete_ingest(defs, instance, images, skip=()):
    """The materializations a complete ingest leaves, in topological order."""
    graph = defs.resolve_asset_graph()
    for key in graph.toposorted_asset_keys:
        node = graph.get(key)
        name = key.to_user_string()
        if not node.is_materializable or name in ("milvus_collection", "similar_images", *skip):
            continue
        for batch in BATCHES if node.is_partitioned else [None]:
            metadata = {folders.CONSUMED_KEY: folders.folder_version(images / batch)} if name == "raw_images" else {}
            _materialize(instance, name, batch, **metadata)


def test_a_fresh_instance_plans_the_whole_chain_in_order(world):
    defs, instance, _ = world
    steps = plan(defs, instance)
    assert _labels(steps) == FULL_PLAN
    assert [s.stage.job for s in steps] == ["embed_batch"] * 2 + ["train_index"] + ["index_shard"] * 2 + [
        "merge_index", "evaluate_index", "analyze_index"]
    assert instance.get_run_records() == []  # planning runs nothing
    with_milvus = plan(defs, instance, milvus=True)
    assert _labels(with_milvus) == FULL_PLAN[:2] + ["milvus b1", "milvus b2"] + FULL_PLAN[2:]


def test_nothing_changed_plans_nothing(world):
    defs, instance, images = world
    _complete_ingest(defs, instance, images)
    assert plan(defs, instance) == []
    observe_folders(instance, images, log=lambda m: None)  # observed again, same versions
    assert plan(defs, instance) == []


def test_a_file_added_to_a_batch_plans_its_chain_down_to_the_index(world):
    defs, instance, images = world
    _complete_ingest(defs, instance, images)
    write_synthetic_batch(images / "b2" / "late", 1, seed=9, size=(32, 32))
    assert plan(defs, instance) == []  # not observed yet: the folder's recorded version is the old one
    observe_folders(instance, images, log=lambda m: None)
    versions = folders.FolderVersions.read(instance)
    assert versions.changed("b2") and not versions.changed("b1")
    # Each stage decides when its turn comes: these run only if the embedding succeeds.
    assert _labels(plan(defs, instance)) == ["embed b2", "shard b2", "merge index", "analyze index"]


def test_an_unreadable_folder_counts_as_changed(world):
    defs, instance, images = world
    _complete_ingest(defs, instance, images)
    for f in (images / "b1").iterdir():
        f.unlink()
    observe_folders(instance, images, log=lambda m: None)
    assert folders.observed_versions(instance)["b1"] == folders.UNREADABLE
    assert _labels(plan(defs, instance))[0] == "embed b1"  # its run reports the problem


def test_trained_models_run_when_missing_asked_for_or_cut_short(world):
    defs, instance, images = world
    _complete_ingest(defs, instance, images)
    # Retraining re-evaluates too: the duplicate threshold belongs to a PCA.
    everything_after_training = ["train index", "shard b1", "shard b2", "merge index", "evaluate index",
                                 "analyze index"]
    assert _labels(plan(defs, instance, retrain=True)) == everything_after_training

    # New embeddings do not retrain (on_missing), they re-shard their batch.
    _materialize(instance, "image_embeddings", "b1")
    assert _labels(plan(defs, instance)) == ["shard b1", "merge index", "analyze index"]

    # A training cut short: PCA newer than the centroids and template fitted on the old one.
    _materialize(instance, "pca_model")
    assert _labels(plan(defs, instance)) == everything_after_training


def test_a_removed_batch_plans_the_merge(world):
    defs, instance, images = world
    _complete_ingest(defs, instance, images)
    assert _labels(plan(defs, instance, removed=["b3"])) == ["merge index", "analyze index"]


def test_the_stages_follow_a_new_edge_of_the_asset_graph(world):
    """An extra input of faiss_index, declared only in the definitions, is followed by the merge."""
    defs, instance, images = world

    @asset
    def extra_feature() -> int:
        return 1

    real = defs.get_assets_def("faiss_index")
    (spec,) = real.specs

    @multi_asset(specs=[spec.merge_attributes(deps=[extra_feature])], name="faiss_index")
    def faiss_index_reading_extra_feature():
        raise NotImplementedError("planned, never run")

    extended = Definitions(
        assets=[faiss_index_reading_extra_feature if a is real else a for a in defs.assets] + [extra_feature],
        asset_checks=defs.asset_checks, jobs=defs.jobs, resources=defs.resources,
    )
    _complete_ingest(defs, instance, images)
    assert plan(extended, instance) == []  # nothing newer than the index yet
    messages = []
    _materialize(instance, "faiss_index_shards", "b1")
    report = IngestReport()
    run_stages(extended, instance, [s for s in STAGES if s.name == "merge index"], report, messages.append)
    assert messages == ["not running merge index: extra_feature has not been materialized yet"]

    for name in ("faiss_index", "near_duplicates", "image_clusters"):
        _materialize(instance, name)
    assert plan(defs, instance) == plan(extended, instance) == []
    _materialize(instance, "extra_feature")
    assert plan(defs, instance) == []  # the code location's own graph has no such edge
    assert _labels(plan(extended, instance)) == ["merge index", "analyze index"]


def test_every_asset_has_its_stage_and_the_stages_agree_with_the_automation_conditions(world):
    """The daemon follows the assets' automation conditions, ingest its stages: they must agree."""
    defs, _, _ = world
    on_demand = {"similar_images", "encoder_comparison"}  # answers to a request: jobs, the CLI
    staged = {AssetKey(a): stage for stage in STAGES for a in stage.assets}
    graph = defs.resolve_asset_graph()
    assert set(staged) | {AssetKey(a) for a in on_demand} == set(graph.materializable_asset_keys)
    for key, stage in staged.items():
        condition = graph.get(key).automation_condition
        if stage.trained:
            assert condition == TRAINED, key
        elif stage.on_request or stage.name == "embed":  # milvus: on request; embedding: the sensor's runs
            assert condition is None, key
        else:
            assert condition is not None and condition != TRAINED, key
        assert graph.get(key).is_partitioned == stage.per_batch, key
        policy = graph.get(key).backfill_policy
        assert stage.batches_per_run == (policy.max_partitions_per_run if policy else 1), key
    for stage in STAGES:
        job = defs.resolve_job_def(stage.job)
        assert {AssetKey(a) for a in stage.assets} == set(job.asset_layer.executable_asset_keys), stage.name


def _fail_recall_check(instance, target_storage_id, recall=0.612, described=True):
    instance.report_runless_asset_event(AssetCheckEvaluation(
        asset_key=AssetKey("faiss_index"), check_name="faiss_index_recall", passed=False,
        metadata={"recall_at_10": recall, "target": 0.95, "nprobe": 1, "queries": 40},
        description=f"recall@10 {recall:.3f} < target 0.95 at nprobe 1: raise nprobe or rebuild" if described else None,
        target_materialization_data=AssetCheckEvaluationTargetMaterializationData(
            storage_id=target_storage_id, run_id="", timestamp=0.0),
    ))


def _latest_storage_id(instance, name):
    return instance.fetch_materializations(AssetRecordsFilter(asset_key=AssetKey(name)), limit=1).records[0].storage_id


def test_a_failed_recall_gate_on_the_current_index_fails_every_ingest(world):
    defs, instance, images = world
    _complete_ingest(defs, instance, images)
    _fail_recall_check(instance, _latest_storage_id(instance, "faiss_index"))
    for _ in range(2):  # every run, not only the one that evaluated it
        report = ingest(defs, instance, images, log=lambda m: None)
        assert not report.ok and report.embedded == [] and not report.merged
        assert report.failed == {
            "check faiss_index_recall": "recall@10 0.612 < target 0.95 at nprobe 1: raise nprobe or rebuild"}
    assert AssetCheckKey(AssetKey("faiss_index"), "faiss_index_recall") in defs.resolve_asset_graph().asset_check_keys

    # A failed check of an earlier index says nothing about the current one.
    _materialize(instance, "faiss_index")
    assert failed_checks(defs, instance) == {}
    _fail_recall_check(instance, _latest_storage_id(instance, "faiss_index"), described=False)  # its figures, then
    assert failed_checks(defs, instance) == {
        "check faiss_index_recall": "nprobe 1, queries 40, recall_at_10 0.612, target 0.95"}


def test_a_failed_recall_gate_blocks_what_reads_the_index(world):
    defs, instance, images = world
    _complete_ingest(defs, instance, images, skip={"near_duplicates"})
    _fail_recall_check(instance, _latest_storage_id(instance, "faiss_index"))
    messages = []
    report = ingest(defs, instance, images, log=messages.append)
    assert not report.analyzed and list(report.failed) == ["check faiss_index_recall"]
    assert any(m.startswith("not running analyze index: check faiss_index_recall failed") for m in messages), messages
    assert instance.get_run_records() == []


def test_dagster_itself_marks_the_manifest_of_a_changed_folder_stale(world):
    """What the UI shows: raw_images read batch_folders' observed version; a new one makes it stale."""
    from dagster._core.definitions.data_version import StaleStatus
    from dagster._utils.test.data_versions import get_stale_status_resolver

    defs, instance, images = world
    assert defs.resolve_job_def("embed_batch").execute_in_process(instance=instance, partition_key="b1").success

    def status():
        return get_stale_status_resolver(instance, list(defs.assets)).get_status(AssetKey("raw_images"), "b1")

    assert status() == StaleStatus.FRESH
    write_synthetic_batch(images / "b1" / "late", 1, seed=9, size=(32, 32))
    observe_folders(instance, images, log=lambda m: None)
    assert status() == StaleStatus.STALE


def test_a_failed_unpartitioned_step_is_reported_by_its_first_line_and_blocks_its_readers(world):
    _, instance, _ = world

    @asset
    def model() -> int:
        raise ValueError("cannot fit: 3 vectors for 8 clusters\n(the whole story is in the run's event log)")

    @asset
    def reader(model: int) -> int:
        return model

    @asset
    def reader_of_reader(reader: int) -> int:
        return reader

    defs = Definitions(assets=[model, reader, reader_of_reader], jobs=[
        define_asset_job("fit", selection=["model"]), define_asset_job("read", selection=["reader"]),
        define_asset_job("read_more", selection=["reader_of_reader"])])
    stages = [Stage("fit model", "fit", ("model",)), Stage("read model", "read", ("reader",)),
              Stage("read more", "read_more", ("reader_of_reader",))]
    assert [step.label for step in plan(defs, instance, stages=stages)] == ["fit model", "read model", "read more"]
    messages, report = [], IngestReport()
    run_stages(defs, instance, stages, report, log=messages.append)
    assert report.failed == {"fit model": "ValueError: cannot fit: 3 vectors for 8 clusters"} and report.done == {}
    assert messages[-2:] == ["not running read model: fit model did not succeed",
                             "not running read more: read model did not succeed"]
