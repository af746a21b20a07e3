"""Each call of :mod:`imgsim_assets.dagster_private` on a real instance: when a Dagster upgrade
changes one, this fails first, naming it."""

from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetKey,
    AssetMaterialization,
    AssetObservation,
    AssetRecordsFilter,
    DagsterInstance,
    DagsterRunStatus,
    asset,
    define_asset_job,
    instance_for_test,
)

from imgsim_assets import dagster_private
from imgsim_assets.instance import ensure_instance_yaml

KEY = AssetKey("things")


def test_an_observation_tagged_with_a_version_has_that_data_version():
    with instance_for_test() as instance:
        instance.report_runless_asset_event(AssetObservation(KEY, partition="p", tags=dagster_private.data_version_tags("v1")))
        (record,) = instance.fetch_observations(AssetRecordsFilter(asset_key=KEY), limit=5).records
        assert record.asset_observation.data_version == "v1" and record.partition_key == "p"


def test_latest_storage_ids_are_those_of_each_partitions_newest_materialization():
    with instance_for_test() as instance:
        for partition in ("a", "b", "a"):
            instance.report_runless_asset_event(AssetMaterialization(KEY, partition=partition))
        records = instance.fetch_materializations(AssetRecordsFilter(asset_key=KEY), limit=10).records
        newest = {}
        for record in records:  # newest first
            newest.setdefault(record.partition_key, record.storage_id)
        assert dagster_private.latest_storage_ids(instance, KEY) == newest and newest["a"] > newest["b"] > 0
        assert dagster_private.latest_storage_ids(instance, AssetKey("nothing")) == {}


def test_latest_check_results_name_the_materialization_they_checked():
    from dagster._core.definitions.asset_checks.asset_check_evaluation import (
        AssetCheckEvaluationTargetMaterializationData,
    )

    check = AssetCheckKey(KEY, "gate")
    with instance_for_test() as instance:
        assert dagster_private.latest_check_results(instance, [check]) == {}
        instance.report_runless_asset_event(AssetMaterialization(KEY))
        target = instance.fetch_materializations(AssetRecordsFilter(asset_key=KEY), limit=1).records[0].storage_id
        for passed in (True, False):
            instance.report_runless_asset_event(AssetCheckEvaluation(
                asset_key=KEY, check_name="gate", passed=passed, metadata={"recall": 0.5},
                target_materialization_data=AssetCheckEvaluationTargetMaterializationData(
                    storage_id=target, run_id="", timestamp=0.0)))
        result = dagster_private.latest_check_results(instance, [check, AssetCheckKey(KEY, "other")])
        assert list(result) == [check]
        assert not result[check].evaluation.passed and result[check].evaluation.metadata["recall"].value == 0.5
        assert result[check].target_storage_id == target and result[check].storage_id > target


def test_a_run_marked_failed_gives_back_its_pool_slots(tmp_path):
    @asset(pool="gpu")
    def on_the_gpu() -> int:
        return 1

    ensure_instance_yaml(tmp_path)  # the local instance's config: pools of one slot
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        job = define_asset_job("gpu_job", selection=[on_the_gpu]).resolve(asset_graph=_graph([on_the_gpu]))
        run = instance.create_run_for_job(job, status=DagsterRunStatus.STARTED)
        storage = instance.event_log_storage
        storage.set_concurrency_slots("gpu", 1)
        assert storage.claim_concurrency_slot("gpu", run.run_id, "on_the_gpu").is_claimed
        assert storage.get_concurrency_info("gpu").active_slot_count == 1
        dagster_private.mark_run_failed(instance, run, "abandoned")
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
        assert storage.get_concurrency_info("gpu").active_slot_count == 0


def _graph(assets):
    from dagster import Definitions

    return Definitions(assets=assets).resolve_asset_graph()


def test_postgres_url_names_the_instances_database_and_decisions_go_there(postgres_url, tmp_path, monkeypatch):
    from dagster import DagsterInstance

    from imgsim_assets.dagster_private import postgres_url as instance_postgres_url
    from imgsim_assets.instance import review_database_url
    from imgsim_assets.settings import Settings

    home = tmp_path / "pg_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(f"storage:\n  postgres:\n    postgres_url: {postgres_url}\n")
    with DagsterInstance.from_config(str(home)) as instance:
        assert instance_postgres_url(instance) == postgres_url
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    assert review_database_url(Settings(data_dir=tmp_path / "data")) == postgres_url
    assert review_database_url(Settings(data_dir=tmp_path / "data", review_db="sqlite:///x.db")) == "sqlite:///x.db"
    local = tmp_path / "local_home"
    local.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(local))
    with DagsterInstance.ephemeral() as instance:
        assert instance_postgres_url(instance) is None
    assert review_database_url(Settings(data_dir=tmp_path / "data")) == f"sqlite:///{tmp_path / 'data' / 'review.db'}"
