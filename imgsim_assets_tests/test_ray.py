"""Decoding and image_embeddings on a Ray cluster of real processes (a head and a worker node,
started with ``ray start`` on loopback): the same files, vectors and rejections as in this
process; an encoder actor killed mid-batch is restarted and nothing is lost or embedded twice;
a decoding task whose worker dies is run again; a model the actors cannot load is said so."""

import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from dagster import AssetKey, AssetRecordsFilter, instance_for_test

from imgsim_assets.core import tables
from imgsim_assets.core.models import EncoderSpec
from imgsim_assets.core.sample_data import write_synthetic_batch
from imgsim_assets.definitions import build_definitions
from imgsim_assets.ingest import ingest
from imgsim_assets.resources import EncoderResource, PreprocessResource
from imgsim_assets.settings import Settings

FILE_TIME_NS = 1_700_000_000_000_000_000
SPEC = EncoderSpec(weights="random", depth=2)
DECODE_CHUNK_FOR_TEST = 4


def _collection(root, source=None):
    """Two batches of pictures, one with a file that is not an image; a copy of ``source`` when given."""
    images = root / "data" / "images"
    if source is not None:
        shutil.copytree(source, images)
    else:
        write_synthetic_batch(images / "b1", 20, seed=1, size=(48, 64))
        write_synthetic_batch(images / "b2", 13, seed=2, size=(64, 48))
        (images / "b2" / "notes.jpg").write_text("this is not a jpeg")
    for file in images.rglob("*"):
        if file.is_file():  # the manifests record file times: both collections' are the same
            os.utime(file, ns=(FILE_TIME_NS, FILE_TIME_NS))
    (root / "home").mkdir()
    return root / "data"


def _ingest(data, home, ray_address=""):
    defs = build_definitions(
        Settings(data_dir=data),
        encoder=EncoderResource(weights="random", depth=2, batch_size=8, device="cpu", ray_address=ray_address),
        preprocessing=PreprocessResource(crop_size=56, resize_size=64, workers=1, ray_address=ray_address),
    )
    with instance_for_test(temp_dir=str(home)) as instance:
        report = ingest(defs, instance, data / "images")
        metadata = {}
        for asset in ("image_embeddings", "cropped_tensors"):
            records = instance.fetch_materializations(
                AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=["b1"]), limit=1).records
            metadata.update({k: v.value for k, v in records[0].asset_materialization.metadata.items()})
    return report, metadata


def test_a_folder_ingested_through_ray_gives_what_this_process_gives(ray_address, tmp_path):
    local_data = _collection(tmp_path / "local")
    report, local_meta = _ingest(local_data, tmp_path / "local" / "home")
    assert report.ok, report.failed
    ray_data = _collection(tmp_path / "ray", source=local_data / "images")
    report, ray_meta = _ingest(ray_data, tmp_path / "ray" / "home", ray_address)
    assert report.ok, report.failed
    assert report.embedded == ["b1", "b2"]
    assert ray_meta["compute"] == f"Ray at {ray_address}: 2 encoder actor(s)" and local_meta["compute"] == "this process"
    assert ray_meta["decoded_by"] == f"Ray at {ray_address}" and local_meta["decoded_by"] == "this machine"
    for batch in ("b1", "b2"):
        assets = {side: data / "assets" for side, data in (("local", local_data), ("ray", ray_data))}
        manifests = [pq.read_table(a / "raw_images" / f"{batch}.parquet").to_pydict() for a in assets.values()]
        assert manifests[0] == manifests[1]  # the same files, rejections and reasons
        files = [pq.read_table(a / "image_embeddings" / f"{batch}.parquet") for a in assets.values()]
        for column in ("image_id", "path", "sha256"):
            assert files[0].column(column).to_pylist() == files[1].column(column).to_pylist()
        assert len(files[0]) == (20 if batch == "b1" else 13)
        local, remote = (tables.embedding_matrix(f) for f in files)
        assert np.abs(local - remote).max() <= 1e-5
        assert tables.provenance_of(files[0].schema) == tables.provenance_of(files[1].schema)
    rejected = pq.read_table(ray_data / "assets" / "raw_images" / "b2.parquet").to_pandas().query("status == 'rejected'")
    assert rejected.path.tolist() == ["b2/notes.jpg"] and rejected.reason.tolist() == ["not_an_image"]


def _batches(n: int, size: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(np.arange(i * size, (i + 1) * size, dtype=np.int64), rng.integers(0, 256, (size, 3, 56, 56), np.uint8))
            for i in range(n)]


def test_an_encoder_actor_killed_mid_batch_is_restarted_and_nothing_is_lost_or_embedded_twice(ray_address):
    from imgsim_assets.core.encoder import Encoder
    from imgsim_assets.core.distributed import RayEncoder

    batches = _batches(10)
    expected = np.concatenate([v for _, v in Encoder(SPEC, device="cpu", batch_size=8).embed_batches(batches)])
    remote = RayEncoder(SPEC, ray_address, device="cpu", batch_size=8)
    try:
        assert remote.actors == 2
        before = remote.actor_pids()
        seen = []

        def feed():
            for i, batch in enumerate(batches):
                if i == 3:  # batches 0-2 are queued or running at the actors: one of them dies
                    os.kill(before[0], signal.SIGKILL)
                yield batch

        out = list(remote.embed_batches(feed(), progress=lambda done, _: seen.append(done)))
        after = remote.actor_pids()
    finally:
        remote.close()
    ids = np.concatenate([i for i, _ in out])
    assert ids.tolist() == list(range(80))  # every image once, in order
    assert np.abs(np.concatenate([v for _, v in out]) - expected).max() <= 1e-5
    assert seen == list(range(8, 81, 8))
    assert after[0] != before[0] and after[1] == before[1]  # the killed actor was started again


def test_a_model_the_actors_cannot_load_is_said_so(ray_address, tmp_path):
    from imgsim_assets.core.distributed import RayEncoder

    missing = tmp_path / "no-such-checkpoint.pth"
    with pytest.raises(RuntimeError, match=r"could not load dinov2_vits14: .*no-such-checkpoint\.pth"):
        RayEncoder(EncoderSpec(weights=str(missing)), ray_address, device="cpu")


def test_files_decoded_in_ray_tasks_come_back_once_in_order_when_a_worker_dies(ray_address, tmp_path):
    from imgsim_assets.core import images
    from imgsim_assets.core.distributed import preprocess_files_on_ray

    write_synthetic_batch(tmp_path / "b", 24, seed=3, size=(1200, 1600))  # a chunk decodes for a while
    (tmp_path / "b" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    files = images.list_batch_files(tmp_path / "b")
    pre = images.Preprocess(crop_size=56, resize_size=64)
    local = list(images.preprocess_files(files, tmp_path, pre, workers=1))
    remote, killed = [], []
    for item in preprocess_files_on_ray(files, tmp_path, pre, ray_address, chunk=DECODE_CHUNK_FOR_TEST):
        remote.append(item)
        deadline = time.monotonic() + 5
        while len(remote) == 1 and not killed and time.monotonic() < deadline:
            # The first chunk is back and the next ones are decoding: kill the workers decoding them.
            for pid in _processes_named("ray::_decode_chunk"):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.005)
    assert killed  # workers died while chunks were being decoded
    assert [r.path for r, _ in remote] == [r.path for r, _ in local]
    assert [(r.status, r.reason, r.image_id) for r, _ in remote] == [(r.status, r.reason, r.image_id) for r, _ in local]
    assert remote[-1][0].reason == "not_an_image" and remote[-1][1] is None
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(remote[:-1], local[:-1]))


def _processes_named(prefix: str) -> list[int]:
    """The pids whose command line starts with ``prefix`` (Ray names a worker by its task)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(prefix.encode()):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found
