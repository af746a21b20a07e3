"""Several batches materialized at once -- separate run processes, each running its steps
in worker processes (the multiprocess executor) -- give the same embeddings and, once
indexed, the same index as one batch after the other."""

import shutil

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from imgsim_assets.core.sample_data import write_synthetic_batch
from imgsim_assets.ingest import ingest
from imgsim_assets.instance import ensure_instance_yaml
from imgsim_assets_tests.contents import assert_same_embeddings, assert_same_index
from imgsim_assets_tests.run_processes import embed_all_at_once, step_pids, tiny_definitions

BATCHES = ["b1", "b2", "b3"]


def test_concurrent_batches_build_the_same_index_as_sequential_runs(tmp_path):
    sequential, concurrent = tmp_path / "sequential", tmp_path / "concurrent"
    for i, batch in enumerate(BATCHES):
        files = write_synthetic_batch(sequential / "images" / batch, 6, seed=40 + i)
        if batch == "b1":
            first = files[0]
    # The same picture in two batches: one image_id, one vector, both paths listed.
    shutil.copy(first, sequential / "images" / "b3" / "copy_of_b1.png")
    shutil.copytree(sequential / "images", concurrent / "images")

    home = sequential / "dagster_home"
    ensure_instance_yaml(home)
    with DagsterInstance.from_config(str(home)) as instance:
        report = ingest(tiny_definitions(sequential), instance, sequential / "images", log=lambda m: None)
        assert report.ok and report.embedded == BATCHES and report.merged, report
        expected = tiny_definitions(sequential).load_asset_value("faiss_index", instance=instance)

    home = concurrent / "dagster_home"
    ensure_instance_yaml(home)
    with DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("image_batches", BATCHES)
        embed_all_at_once(concurrent, home, BATCHES)
        records = instance.get_run_records(RunsFilter(job_name="embed_batch", statuses=[DagsterRunStatus.SUCCESS]))
        assert len(records) == len(BATCHES)
        assert max(r.start_time for r in records) < min(r.end_time for r in records), "the runs did not overlap"
        pids = step_pids(instance, [r.dagster_run.run_id for r in records])
        assert len(pids) == 2 * len(BATCHES)  # each step in a process of its own
        # The rest of the chain (training, shards, merge) reads what the concurrent runs wrote.
        report = ingest(tiny_definitions(concurrent), instance, concurrent / "images", log=lambda m: None)
        assert report.ok and report.embedded == [] and report.trained and report.merged, report
        actual = tiny_definitions(concurrent).load_asset_value("faiss_index", instance=instance)

    assert expected.num_vectors == 6 * len(BATCHES) and len(expected.catalog) == 6 * len(BATCHES) + 1
    assert_same_index(actual, expected)
    assert_same_embeddings(concurrent / "assets", sequential / "assets", BATCHES)
    copies = [r for r in expected.catalog.to_pylist() if r["path"] in (f"b1/{first.name}", "b3/copy_of_b1.png")]
    assert len(copies) == 2 and copies[0]["image_id"] == copies[1]["image_id"]
