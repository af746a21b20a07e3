"""The instance on PostgreSQL: two batches materialized at once by two run processes, each
executing its steps in worker processes (the multiprocess executor)."""

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from imgsim_assets.core.sample_data import write_synthetic_batch
from imgsim_assets.ingest import ingest
from imgsim_assets_tests.run_processes import embed_all_at_once, step_pids, tiny_definitions


def test_two_batches_concurrently_against_postgres(postgres_url, tmp_path, monkeypatch):
    data, home = tmp_path / "data", tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(f"storage:\n  postgres:\n    postgres_url: {postgres_url}\n"
                                       "telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    for i, batch in enumerate(("b1", "b2")):
        write_synthetic_batch(data / "images" / batch, 12, seed=i)

    with DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        instance.add_dynamic_partitions("image_batches", ["b1", "b2"])
        embed_all_at_once(data, home, ["b1", "b2"])

        runs = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.SUCCESS]))
        assert sorted(r.tags["dagster/partition"] for r in runs) == ["b1", "b2"]
        assert len(step_pids(instance, [r.run_id for r in runs])) == 4  # every step in a worker process of its own

        # The rest of the chain reads what the two runs recorded in Postgres.
        report = ingest(tiny_definitions(data), instance, data / "images", log=lambda m: None)
        assert report.ok and report.embedded == [] and report.merged
        assert tiny_definitions(data).load_asset_value("faiss_index", instance=instance).num_vectors == 24
