"""The new_image_batches sensor on a real folder: completeness, changes, bounded ticks."""

import json
import os

from dagster import AssetMaterialization, DagsterInstance, SensorResult, SkipReason, build_sensor_context

from imgsim_assets.assets import folders
from imgsim_assets.assets.folders import folder_version
from imgsim_assets.core.sample_data import write_synthetic_batch
from imgsim_assets.resources import StorageResource, WatchResource
from imgsim_assets.sensors import new_image_batches
from imgsim_assets.watch import plan_tick


def _batch(root, name, n=2, seed=0, done=True):
    write_synthetic_batch(root / name, n, seed=seed, size=(32, 32))
    if done:
        (root / name / "_SUCCESS").touch()


def test_complete_folders_run_once_and_incomplete_ones_wait_for_quiet(tmp_path):
    _batch(tmp_path, "b1")
    _batch(tmp_path, "b2", done=False)
    tick = plan_tick(tmp_path, {}, set(), now=1000.0, quiet_seconds=60)
    assert tick.new_partitions == ["b1"] and [b for b, _ in tick.runs] == ["b1"] and tick.waiting == ["b2"]

    tick = plan_tick(tmp_path, tick.cursor, {"b1"}, now=1030.0, quiet_seconds=60)
    assert tick.runs == [] and tick.waiting == ["b2"]  # b1 done; b2 quiet for 30 s only
    tick = plan_tick(tmp_path, tick.cursor, {"b1"}, now=1061.0, quiet_seconds=60)
    assert tick.new_partitions == ["b2"] and [b for b, _ in tick.runs] == ["b2"]
    tick = plan_tick(tmp_path, tick.cursor, {"b1", "b2"}, now=1200.0, quiet_seconds=60)
    assert tick.runs == [] and tick.new_partitions == []


def test_files_added_to_a_known_batch_rerun_it_after_quiet(tmp_path):
    _batch(tmp_path, "b1")
    tick = plan_tick(tmp_path, {}, set(), now=0.0)
    first = tick.runs[0][1]
    write_synthetic_batch(tmp_path / "b1" / "late", 1, seed=9, size=(32, 32))
    tick = plan_tick(tmp_path, tick.cursor, {"b1"}, now=10.0)
    # _SUCCESS is there, so the change is picked up at once, with a new fingerprint.
    assert tick.new_partitions == [] and len(tick.runs) == 1 and tick.runs[0][1] != first


def test_a_batch_runs_only_when_its_folder_is_not_the_version_its_manifest_read(tmp_path):
    _batch(tmp_path, "b1")
    _batch(tmp_path, "b2", seed=1)
    read = {"b1": folder_version(tmp_path / "b1")}  # b1 was ingested as it is now
    tick = plan_tick(tmp_path, {}, {"b1", "b2"}, now=0.0, consumed=read.get)
    b2 = folder_version(tmp_path / "b2")
    assert tick.runs == [("b2", b2)]
    assert tick.observations == [("b1", read["b1"]), ("b2", b2)]  # first look at known partitions

    write_synthetic_batch(tmp_path / "b1" / "late", 1, seed=9, size=(32, 32))
    tick = plan_tick(tmp_path, tick.cursor, {"b1", "b2"}, now=1.0, consumed=read.get)
    b1 = folder_version(tmp_path / "b1")
    assert b1 != read["b1"] and tick.runs == [("b1", b1)] and tick.observations == [("b1", b1)]


def test_ticks_are_bounded_and_resume_round_robin(tmp_path):
    for i in range(5):
        _batch(tmp_path, f"b{i}", n=1, seed=i)
    seen, cursor = [], {}
    for _ in range(3):
        tick = plan_tick(tmp_path, cursor, set(seen), now=0.0, max_batches=2)
        assert len(tick.runs) <= 2
        seen += [b for b, _ in tick.runs]
        cursor = json.loads(json.dumps(tick.cursor))  # the cursor survives serialisation
    assert seen == ["b0", "b1", "b2", "b3", "b4"]


def test_invalid_names_empty_and_vanished_folders(tmp_path):
    _batch(tmp_path, "ok")
    (tmp_path / "bad,name").mkdir()
    (tmp_path / "empty").mkdir()
    _batch(tmp_path, os.fsdecode(b"caf\xe9"))  # a Latin-1 folder name: no partition key
    tick = plan_tick(tmp_path, {}, set(), now=0.0)
    assert [b for b, _ in tick.runs] == ["ok"] and tick.waiting == ["empty"]
    assert tick.invalid == {"bad,name": "contains one of [ ] , * / \\ or starts with '.'",
                            "caf\\xe9": "not valid UTF-8 (partition keys are text; rename the folder)"}
    json.dumps(tick.cursor).encode("utf-8")  # the cursor and the log lines stay valid text
    for f in (tmp_path / "ok").iterdir():
        f.unlink()
    (tmp_path / "ok").rmdir()
    after = plan_tick(tmp_path, tick.cursor, {"ok"}, now=1.0)
    assert "ok" not in after.cursor["folders"] and after.removed_partitions == ["ok"]


def test_sensor_registers_partitions_and_requests_runs(tmp_path):
    images = tmp_path / "data" / "images"
    _batch(images, "batch-1")
    with DagsterInstance.ephemeral() as instance:
        context = build_sensor_context(
            instance=instance,
            resources={"storage": StorageResource(data_dir=str(tmp_path / "data")), "watch": WatchResource()},
        )
        result = new_image_batches(context)
        assert isinstance(result, SensorResult)
        assert [r.partition_key for r in result.run_requests] == ["batch-1"]
        assert result.dynamic_partitions_requests[0].partition_keys == ["batch-1"]
        instance.add_dynamic_partitions("image_batches", ["batch-1"])
        again = build_sensor_context(instance=instance, cursor=context.cursor, resources={
            "storage": StorageResource(data_dir=str(tmp_path / "data")), "watch": WatchResource()})
        assert isinstance(new_image_batches(again), SkipReason)


def test_sensor_ticks_wait_for_incomplete_folders_and_resume_from_the_cursor(tmp_path):
    images = tmp_path / "data" / "images"
    _batch(images, "a")
    _batch(images, "b")
    _batch(images, "c", done=False)  # still being copied
    storage = StorageResource(data_dir=str(tmp_path / "data"))
    watch = WatchResource(max_batches_per_tick=2, quiet_seconds=3600)
    cursor, requested = None, []
    with DagsterInstance.ephemeral() as instance:
        for _ in range(3):
            context = build_sensor_context(instance=instance, cursor=cursor,
                                           resources={"storage": storage, "watch": watch})
            result = new_image_batches(context)
            cursor = context.cursor
            if isinstance(result, SensorResult):
                requested += [r.partition_key for r in result.run_requests]
                for request in result.dynamic_partitions_requests:
                    instance.add_dynamic_partitions("image_batches", list(request.partition_keys))
            else:
                assert "waiting for c" in result.skip_message
        assert requested == ["a", "b"]  # two per tick at most; c waits for _SUCCESS or quiet
        write_synthetic_batch(images / "a" / "more", 1, seed=7, size=(32, 32))  # files added to a
        (images / "c" / "_SUCCESS").touch()
        later = []
        for _ in range(2):  # three folders, two per tick: both changes within two ticks
            context = build_sensor_context(instance=instance, cursor=cursor, resources={"storage": storage, "watch": watch})
            result = new_image_batches(context)
            cursor = context.cursor
            later += [r.partition_key for r in getattr(result, "run_requests", [])]
        assert sorted(later) == ["a", "c"]


def test_sensor_observes_folder_versions_and_keys_runs_by_them(tmp_path):
    images = tmp_path / "data" / "images"
    _batch(images, "a")
    _batch(images, "b", seed=1)
    resources = {"storage": StorageResource(data_dir=str(tmp_path / "data")), "watch": WatchResource()}
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("image_batches", ["a", "b"])
        # a's manifest was built from the folder as it is (by `imgsim ingest`, say); b's never was.
        instance.report_runless_asset_event(AssetMaterialization(
            "raw_images", partition="a", metadata={folders.CONSUMED_KEY: folder_version(images / "a")}))
        result = new_image_batches(build_sensor_context(instance=instance, resources=resources))
        version = folder_version(images / "b")
        assert [(r.partition_key, r.run_key) for r in result.run_requests] == [("b", f"b:{version}")]
        observed = {e.partition: e.data_version for e in result.asset_events}
        assert observed == {"a": folder_version(images / "a"), "b": version}
        for event in result.asset_events:  # what the sensor daemon does with them
            instance.report_runless_asset_event(event)
        # The sensor and ingest agree on what changed.
        versions = folders.FolderVersions.read(instance)
        assert not versions.changed("a") and versions.changed("b")
