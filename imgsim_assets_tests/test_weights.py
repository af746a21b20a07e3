"""Weights fetched on first use from a stand-in hub on loopback: progress, zero requests once
cached or offline, clear errors for every fault with nothing left to load, concurrent fetchers;
and the fingerprint that ties every vector to its weights."""

import json
import os
import subprocess
import sys
import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from imgsim_assets.core import weights
from imgsim_assets.core.dinov2 import load_dinov2
from imgsim_assets_tests.hub import Hub

MODEL = "dinov2_vits14"
REPO_FILE = f"{weights.hub_repo(MODEL)}/{weights.HUB_FILENAME}"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """timm's ViT-S/14 DINOv2 layout, every name and shape, seeded random values."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    path = tmp_path_factory.mktemp("checkpoint") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture
def hub(checkpoint, tmp_path, monkeypatch):
    """The stand-in hub, and an environment whose caches are empty and point at it."""
    server = Hub({REPO_FILE: checkpoint})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("IMGSIM_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("IMGSIM_FETCH_TIMEOUT", "1")
    yield server
    server.close()


def test_first_use_fetches_with_progress_then_never_asks_again(hub, monkeypatch):
    lines = []
    path = weights.resolve(MODEL, "auto", progress=lines.append)
    assert weights.sha256_of(path) == hub.sha256[REPO_FILE]
    assert lines[0].startswith(f"fetching {MODEL} weights (88 MB, Apache-2.0) from {hub.url}/")
    done = lines[-2]
    assert done.startswith(f"fetching {weights.hub_repo(MODEL)}: 88.2/88.2 MB (100%)")
    assert "MB/s" in done and "ETA 0 s" in done
    assert lines[-1].startswith(f"{MODEL} weights verified (sha256:{hub.sha256[REPO_FILE]}")
    model = load_dinov2(MODEL, "auto")
    assert model.blocks[11].attn.qkv.weight.shape == (1152, 384)
    assert weights.fingerprint(path, MODEL) == "sha256:" + hub.sha256[REPO_FILE]

    served = hub.count()
    assert weights.resolve(MODEL, "auto") == path and hub.count() == served  # cached: no request at all
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights.check(MODEL, "auto") == path and hub.count() == served  # offline with a filled cache


def test_offline_with_an_empty_cache_makes_no_request_and_names_the_ways_out(hub, monkeypatch):
    monkeypatch.setenv("IMGSIM_OFFLINE", "1")
    with pytest.raises(weights.WeightsUnavailable) as e:
        weights.resolve(MODEL, "auto")
    assert hub.count() == 0
    message = str(e.value)
    assert "offline" in message and "imgsim weights fetch" in message and "IMGSIM_WEIGHTS=" in message
    assert "--fallback-random" in message and "HF_ENDPOINT" in message


@pytest.mark.parametrize("fault, expected", [
    ("403", "HTTP 403"), ("404", "HTTP 404"), ("500", "HTTP 500"),
    ("truncate", "fetching .* failed"), ("corrupt", "corrupt and was removed: its sha256 is"),
    ("stall", "fetching .* failed"),
])
def test_a_fault_is_a_clear_error_leaves_nothing_to_load_and_a_retry_succeeds(hub, fault, expected):
    hub.fault = fault
    hub.stall_s = 3.0
    began = time.monotonic()
    with pytest.raises(weights.WeightsUnavailable, match=expected):
        weights.resolve(MODEL, "auto")
    assert time.monotonic() - began < 30  # retries of a dropped transfer included (5, each after 1 s)
    assert weights.find_local(MODEL) is None  # nothing a load would find
    hub.fault = None
    path = weights.resolve(MODEL, "auto")
    assert weights.sha256_of(path) == hub.sha256[REPO_FILE]


def test_a_mirror_behind_a_proxy(hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.invalid")  # resolvable by the proxy alone
    monkeypatch.setenv("HTTP_PROXY", hub.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    path = weights.resolve(MODEL, "auto")
    assert weights.sha256_of(path) == hub.sha256[REPO_FILE] and hub.proxied == hub.count() == 2  # HEAD, GET


def test_the_token_goes_to_the_hub_and_not_to_its_file_storage(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    hub.redirect = True  # resolve answers 302 to storage on another host name, as huggingface.co does
    path = weights.resolve(MODEL, "auto")
    assert weights.sha256_of(path) == hub.sha256[REPO_FILE]
    seen = dict(hub.authorization)
    assert seen[f"/{weights.hub_repo(MODEL)}/resolve/main/{weights.HUB_FILENAME}"] == "Bearer hf_secret"
    assert seen[f"/storage/{REPO_FILE}"] == ""


def test_a_file_of_another_size_than_the_model_is_not_fetched(hub, tmp_path, monkeypatch):
    small = tmp_path / "small.safetensors"
    small.write_bytes(b"\0" * 4096)
    hub.close()
    liar = Hub({REPO_FILE: small})
    monkeypatch.setenv("HF_ENDPOINT", liar.url)
    try:
        with pytest.raises(weights.WeightsUnavailable, match=r"announces 4,096 bytes, but dinov2_vits14's weights"):
            weights.resolve(MODEL, "auto")
        assert liar.count("GET") == 0 and weights.find_local(MODEL) is None
    finally:
        liar.close()


def test_no_network_is_one_clear_message_within_seconds(hub, monkeypatch):
    hub.close()  # a refused connection: nothing listens there any more
    began = time.monotonic()
    with pytest.raises(weights.WeightsUnavailable, match="is not reachable") as e:
        weights.resolve(MODEL, "auto")
    assert time.monotonic() - began < 5
    assert "imgsim weights fetch" in str(e.value)


def test_two_processes_fetching_at_once_end_with_one_good_file(hub):
    code = ("import sys; from imgsim_assets.core import weights; "
            "print(weights.resolve('dinov2_vits14', 'auto'))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=os.environ.copy()) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1 and weights.sha256_of(paths.pop()) == hub.sha256[REPO_FILE]
    bodies = [path for method, path in hub.requests if method == "GET"]
    assert len(bodies) == 1  # the second waited for the first instead of fetching again


def test_cli_weights_list_fetch_which(hub, tmp_path):
    env = {**os.environ, "IMGSIM_DATA_DIR": str(tmp_path / "data")}

    def imgsim(*args):
        return subprocess.run([sys.executable, "-m", "imgsim_assets.cli", *args], capture_output=True, text=True,
                              env=env, timeout=120)

    listed = imgsim("weights", "list")
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()
    assert sum("not fetched" in r for r in rows) == 8 and "Apache-2.0" in listed.stdout
    assert any(r.split()[0] == "dinov2_vitg14_reg" and "4,5" in r for r in rows)  # 1.1B parameters in fp32
    which = imgsim("weights", "which")
    assert which.returncode == 1 and "not fetched" in which.stdout and hub.count() == 0
    fetched = imgsim("weights", "fetch", MODEL)
    assert fetched.returncode == 0, fetched.stderr
    assert f"sha256:{hub.sha256[REPO_FILE]}" in fetched.stdout
    which = imgsim("weights", "which")
    assert which.returncode == 0 and f"sha256:{hub.sha256[REPO_FILE]}" in which.stdout
    listed = imgsim("weights", "list")
    assert sum("not fetched" in r for r in listed.stdout.splitlines()) == 7


def test_fingerprints_name_the_file_or_what_makes_random_weights(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    assert weights.fingerprint(str(a)) == "sha256:7692c3ad3540bb803c020b3aee66cd8887123234ea0c6e7143c0add73ff431ed"
    assert weights.fingerprint(str(a)) != weights.fingerprint(str(b))
    a.write_bytes(b"three")  # the same path, new content: hashed again
    assert weights.fingerprint(str(a)) == "sha256:" + __import__("hashlib").sha256(b"three").hexdigest()
    random = weights.fingerprint("random")
    assert random == f"random:seed=0:torch={torch.__version__}:timm={timm.__version__}"
    cache = json.loads((weights._digest_cache()).read_text())
    assert sum(key.startswith(f"{a.resolve()}:") for key in cache) == 1  # one entry per file, the newest


def _depth2_checkpoint(path, seed: int) -> str:
    """Official-layout ViT-S/14 weights with 2 blocks; returns the fingerprint."""
    from imgsim_assets.core import dinov2

    torch.manual_seed(seed)
    model = dinov2.DinoVisionTransformer(dinov2.VARIANTS[MODEL], depth=2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    torch.save(model.state_dict(), path)
    return "sha256:" + __import__("hashlib").sha256(path.read_bytes()).hexdigest()


def test_an_index_refuses_queries_of_other_weights_and_ingest_asks_for_retrain(tmp_path):
    import shutil

    from dagster import instance_for_test

    from imgsim_assets.core.sample_data import write_synthetic_batch
    from imgsim_assets.core.search import EncoderMismatch, FaissSearcher, ImageIndex
    from imgsim_assets.definitions import build_definitions
    from imgsim_assets.ingest import EncoderChanged, ingest
    from imgsim_assets.resources import EncoderResource, PreprocessResource
    from imgsim_assets.settings import Settings

    fa, fb = _depth2_checkpoint(tmp_path / "a.pth", 1), _depth2_checkpoint(tmp_path / "b.pth", 2)
    configured = tmp_path / "dinov2_vits14_pretrain.pth"  # what IMGSIM_WEIGHTS names; its content changes
    shutil.copy(tmp_path / "a.pth", configured)
    settings = Settings(data_dir=tmp_path / "data")
    defs = build_definitions(settings, encoder=EncoderResource(weights=str(configured), depth=2, batch_size=16,
                                                               device="cpu"),
                             preprocessing=PreprocessResource(crop_size=112, resize_size=128, workers=1))
    write_synthetic_batch(settings.images_dir / "b1", 20, seed=1)
    (tmp_path / "dagster_home").mkdir()
    with instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        assert ingest(defs, instance, settings.images_dir, log=lambda m: None).ok
        index = ImageIndex.load(settings.assets_dir / "faiss_index")
        assert index.info["encoder"]["weights_fingerprint"] == fa and index.info["encoder"]["dtype"] == "float32"
        assert FaissSearcher.open(settings.assets_dir, device="cpu").encoder.weights_fingerprint == fa

        shutil.copy(tmp_path / "b.pth", configured)  # other weights under the same name
        with pytest.raises(EncoderMismatch) as e:
            FaissSearcher.open(settings.assets_dir, device="cpu").encoder  # noqa: B018
        assert fa[:19] in str(e.value) and fb[:19] in str(e.value) and "--allow-other-weights" in str(e.value)
        searcher = FaissSearcher.open(settings.assets_dir, device="cpu", allow_other_weights=True)
        assert searcher.encoder.weights_fingerprint == fb
        elsewhere = {**index.info["encoder"], "weights_file": "random",
                     "weights_fingerprint": "random:seed=0:torch=2.0.0:timm=0.9.0"}  # random weights of another torch
        with pytest.raises(EncoderMismatch, match=r"torch=2\.0\.0.*torch=" + __import__("re").escape(torch.__version__)):
            FaissSearcher(ImageIndex(index.index, index.catalog, {**index.info, "encoder": elsewhere}),
                          device="cpu").encoder  # noqa: B018

        with pytest.raises(EncoderChanged, match=r"--retrain") as e:
            ingest(defs, instance, settings.images_dir, log=lambda m: None)
        assert fa[:19] in str(e.value) and fb[:19] in str(e.value)
        report = ingest(defs, instance, settings.images_dir, retrain=True, log=lambda m: None)
        assert report.ok, report.failed
        assert report.embedded == ["b1"] and report.trained and report.merged
        rebuilt = ImageIndex.load(settings.assets_dir / "faiss_index")
        assert rebuilt.info["encoder"]["weights_fingerprint"] == fb
        assert FaissSearcher.open(settings.assets_dir, device="cpu").encoder.weights_fingerprint == fb


def test_a_fresh_machine_fetches_once_with_progress_in_the_run_log(hub, tmp_path):
    from dagster import instance_for_test

    from imgsim_assets.core.sample_data import write_synthetic_batch
    from imgsim_assets.core.search import ImageIndex
    from imgsim_assets.definitions import build_definitions
    from imgsim_assets.ingest import ingest
    from imgsim_assets.resources import EncoderResource, PreprocessResource
    from imgsim_assets.settings import Settings

    settings = Settings(data_dir=tmp_path / "data")
    defs = build_definitions(settings, encoder=EncoderResource(weights="auto", batch_size=16, device="cpu"),
                             preprocessing=PreprocessResource(crop_size=56, resize_size=64, workers=1))
    write_synthetic_batch(settings.images_dir / "b1", 12, seed=1)
    (tmp_path / "dagster_home").mkdir()
    with instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
        report = ingest(defs, instance, settings.images_dir, log=lambda m: None)
        assert report.ok, report.failed
        embed_runs = [r for r in instance.get_runs() if r.job_name == "embed_batch"]
        messages = [e.user_message for r in embed_runs for e in instance.all_logs(r.run_id)]
        assert any(m.startswith("fetching dinov2_vits14 weights (88 MB, Apache-2.0) from " + hub.url) for m in messages)
        assert any(m.startswith(f"fetching {weights.hub_repo(MODEL)}: 88.2/88.2 MB (100%)") for m in messages)
        assert any(f"verified (sha256:{hub.sha256[REPO_FILE]}" in m for m in messages)
        index = ImageIndex.load(settings.assets_dir / "faiss_index")
        assert index.info["encoder"]["weights_fingerprint"] == "sha256:" + hub.sha256[REPO_FILE]

        served = hub.count()
        write_synthetic_batch(settings.images_dir / "b2", 12, seed=2)
        report = ingest(defs, instance, settings.images_dir, log=lambda m: None)
        assert report.ok and report.embedded == ["b2"] and hub.count() == served  # the cache answers
