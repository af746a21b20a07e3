"""The `imgsim` console script, as a user runs it: a fresh data dir, ingest, search."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from PIL import Image

from imgsim_assets.core.images import metadata as md
from imgsim_assets.core.sample_data import write_synthetic_batch
from imgsim_assets_tests.pictures import photo

IMGSIM = [sys.executable, "-m", "imgsim_assets.cli"]


def _run(args, env):
    return subprocess.run(IMGSIM + args, env=env, capture_output=True, text=True, timeout=600)


def _camera_batch(folder: Path) -> None:
    """Three 200×150 JPEGs: one from a Canon in June 2021, one from an iPhone in 2022, one
    without EXIF."""
    folder.mkdir(parents=True)
    for i, (make, model, taken) in enumerate((("Canon", "Canon EOS R5", "2021:06:15 10:00:00"),
                                              ("Apple", "iPhone 12", "2022:01:01 09:30:00"), (None, None, None))):
        exif = Image.Exif()
        if make:
            exif[md.MAKE], exif[md.MODEL] = make, model
            exif.get_ifd(md.EXIF_IFD)[md.DATETIME_ORIGINAL] = taken
        Image.fromarray(photo(150, 200, seed=30 + i)).save(folder / f"shot{i}.jpg", exif=exif.tobytes())


def test_ingest_then_search_json(tmp_path):
    data = tmp_path / "data"
    files = write_synthetic_batch(data / "images" / "first", 8, seed=5)
    write_synthetic_batch(data / "images" / "second", 4, seed=6)
    _camera_batch(data / "images" / "cameras")
    env = {**os.environ, "IMGSIM_DATA_DIR": str(data), "IMGSIM_WEIGHTS": "random", "IMGSIM_DEVICE": "cpu"}
    env.pop("DAGSTER_HOME", None)

    ingest = _run(["ingest", "--milvus"], env)
    assert ingest.returncode == 0, ingest.stderr[-2000:]
    assert "RANDOM WEIGHTS" in ingest.stderr
    assert "3 batch(es) embedded" in ingest.stdout
    assert (data / "dagster_home" / "dagster.yaml").exists()

    search = _run(["search", str(files[3]), "-k", "3", "--json"], env)
    assert search.returncode == 0, search.stderr[-2000:]
    hits = json.loads(search.stdout)["hits"]
    assert len(hits) == 3
    assert hits[0]["path"] == "first/" + Path(files[3]).name
    assert abs(hits[0]["score"] - (hits[0]["inner_product"] + 1) / 2) < 1e-6

    # Query by an indexed image's id, answering only from another batch.
    by_id = _run(["search", "--id", str(hits[0]["image_id"]), "--batch", "second", "-k", "10", "--json"], env)
    assert by_id.returncode == 0, by_id.stderr[-2000:]
    answer = json.loads(by_id.stdout)
    assert answer["query"].startswith(f"image_id {hits[0]['image_id']}")
    assert len(answer["hits"]) == 4 and {h["batch"] for h in answer["hits"]} == {"second"}
    unknown = _run(["search", "--id", "12345"], env)
    assert unknown.returncode == 2 and "not in the index" in unknown.stderr

    # Photo filters: capture time, camera, size (the synthetic pictures are 128×96, without EXIF).
    def paths(*args) -> list[str]:
        found = _run(["search", str(files[3]), "-k", "15", "--json", *args], env)
        assert found.returncode == 0, found.stderr[-2000:]
        return sorted(h["path"] for h in json.loads(found.stdout)["hits"])

    assert paths("--camera", "CANON eos") == ["cameras/shot0.jpg"]
    assert paths("--taken-after", "2021-06-15T10:00", "--taken-before", "2022-01-01T09:30") == ["cameras/shot0.jpg"]
    assert paths("--taken-after", "2021-06-15T10:00:01") == ["cameras/shot1.jpg"]
    assert paths("--min-pixels", "20000") == ["cameras/shot0.jpg", "cameras/shot1.jpg", "cameras/shot2.jpg"]
    assert paths("--min-pixels", "20000", "--camera", "iphone", "--batch", "cameras") == ["cameras/shot1.jpg"]
    bad = _run(["search", str(files[3]), "--taken-after", "last week"], env)
    assert bad.returncode == 2 and "taken_after must be an ISO 8601 date" in bad.stderr
    milvus_photo = _run(["search", str(files[3]), "--backend", "milvus", "--camera", "canon"], env)
    assert milvus_photo.returncode == 2 and "Milvus collection holds no photo metadata" in milvus_photo.stderr

    # The same query answered by the Milvus Lite collection that `ingest --milvus` filled.
    # Raw vectors of a random-weight ViT are nearly collinear, so compare scores, not ranks.
    from_milvus = _run(["search", str(files[3]), "-k", "8", "--json", "--backend", "milvus", "--batch", "first"], env)
    assert from_milvus.returncode == 0, from_milvus.stderr[-2000:]
    milvus_hits = json.loads(from_milvus.stdout)["hits"]
    assert len(milvus_hits) == 8 and {h["batch"] for h in milvus_hits} == {"first"}
    own = next(h for h in milvus_hits if h["image_id"] == hits[0]["image_id"])
    assert own["path"] == hits[0]["path"] and own["inner_product"] >= milvus_hits[0]["inner_product"] - 1e-5
    assert (data / "milvus.db").exists()

    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    refused = _run(["search", str(bad)], env)
    assert refused.returncode == 2 and "not_an_image" in refused.stderr


def test_search_before_ingest_is_a_clear_error(tmp_path):
    env = {**os.environ, "IMGSIM_DATA_DIR": str(tmp_path / "data"), "IMGSIM_WEIGHTS": "random"}
    env.pop("DAGSTER_HOME", None)
    result = _run(["search", str(tmp_path / "x.png")], env)
    assert result.returncode != 0
    assert "faiss_index" in result.stderr


def test_an_instance_database_that_is_down_is_a_clear_error(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (home / "dagster.yaml").write_text(
        f"storage:\n  postgres:\n    postgres_url: postgresql://nobody@127.0.0.1:{port}/dagster\n")
    env = {**os.environ, "IMGSIM_DATA_DIR": str(tmp_path / "data"), "DAGSTER_HOME": str(home), "IMGSIM_WEIGHTS": "random"}
    (tmp_path / "data" / "images").mkdir(parents=True)
    result = _run(["ingest"], env)
    assert result.returncode == 2
    assert "cannot be reached" in result.stderr and "Is its database up?" in result.stderr
    assert "Traceback" not in result.stderr


def test_first_run_without_a_checkpoint_stops_before_any_run(tmp_path):
    data = tmp_path / "data"
    write_synthetic_batch(data / "images" / "first", 4, seed=5)
    env = {**os.environ, "IMGSIM_DATA_DIR": str(data), "IMGSIM_WEIGHTS": "auto", "HF_HOME": str(tmp_path / "hf"),
           "TORCH_HOME": str(tmp_path / "torch")}
    for name in ("DAGSTER_HOME", "HF_HUB_CACHE"):
        env.pop(name, None)
    offline = _run(["ingest"], env)  # the suite runs with HF_HUB_OFFLINE=1
    with socket.socket() as s:  # and a hub where nothing listens: no network
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    unreachable = _run(["ingest"], {**env, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": closed})
    for result, why in ((offline, "no weights for dinov2_vits14 in the caches, and offline mode"),
                        (unreachable, f"cannot fetch dinov2_vits14 weights: {closed} is not reachable")):
        assert result.returncode == 2, result.stderr[-2000:]
        message = result.stderr
        assert message.count(why) == 1
        assert "dinov2_vits14_pretrain.pth" in message and "--fallback-random" in message  # whole, last line too
        assert "imgsim weights fetch dinov2_vits14" in message
        assert "Traceback" not in message and "RUN_START" not in message and result.stdout == ""
        assert not (data / "assets").exists()  # nothing ran

    bad = _run(["ingest"], {**env, "IMGSIM_MODEL": "dinov2_vitx14"})
    assert bad.returncode == 2 and "unknown DINOv2 model 'dinov2_vitx14'" in bad.stderr
    assert "Traceback" not in bad.stderr
