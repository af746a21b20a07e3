import os

import pytest

from imgsim_assets_tests.servers import unavailable

# Keep CPU tests predictable on small CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# The encoder's forward pass in PyTorch eager, the reference, wherever the product's settings are
# read (the CLI, build_definitions): auto would measure every backend on each tiny model first.
# test_backends.py exercises the others and auto.
os.environ.setdefault("IMGSIM_ENCODER_BACKEND", "torch")
# No test reaches the Hugging Face hub: a test that fetches serves the hub itself on loopback
# (imgsim_assets_tests/hub.py) and lifts this for itself. Subprocesses inherit it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("HF_ENDPOINT", None)


@pytest.fixture(autouse=True, scope="session")
def _private_caches(tmp_path_factory):
    """The checkpoint digests this suite computes are remembered in its own cache folder."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))


@pytest.fixture
def no_pretrained(tmp_path, monkeypatch):
    """Empty HF and torch hub caches, so weights='auto' finds nothing (and, offline, fetches nothing)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


@pytest.fixture(scope="session")
def postgres_url():
    """A fresh PostgreSQL database on loopback. CI installs the server (.ci/run) and sets
    IMGSIM_REQUIRE_POSTGRES=1, so there a missing server fails instead of skipping."""
    from imgsim_assets_tests.postgres import PostgresServer, server_binaries

    bin_dir = server_binaries()
    if bin_dir is None:
        unavailable("PostgreSQL server not installed (apt-get install postgresql)", "IMGSIM_REQUIRE_POSTGRES")
    server = PostgresServer(bin_dir)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def milvus_server_uri():
    """A fresh Milvus standalone server on loopback (``http://127.0.0.1:PORT``). The dev extra
    installs it (PyPI's `milvus`, x86-64 Linux); CI sets IMGSIM_REQUIRE_MILVUS_SERVER=1, so
    there a missing server fails instead of skipping."""
    from imgsim_assets_tests.milvus_server import MilvusServer, server_package

    package = server_package()
    if package is None:
        unavailable("Milvus server not installed (pip install 'milvus==2.3.5', in the dev extra for x86-64 Linux)",
                    "IMGSIM_REQUIRE_MILVUS_SERVER")
    server = MilvusServer(package)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_address():
    """A two-node Ray cluster (one CPU each) of real processes on loopback, and this process
    connected to it. CI installs Ray (RAY=1, the [ray] extra) and sets IMGSIM_REQUIRE_RAY=1, so
    there a missing Ray fails instead of skipping."""
    from imgsim_assets_tests.ray_cluster import RayCluster, require_ray

    require_ray()
    import ray

    cluster = RayCluster(nodes=2, cpus=1)
    try:
        address = cluster.start()
        yield address
    finally:
        ray.shutdown()
        cluster.stop()
