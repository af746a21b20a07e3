import os

import pytest

# Keep CPU tests predictable on small CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def no_pretrained(tmp_path, monkeypatch):
    """Empty HF and torch hub caches, so weights='auto' finds nothing."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path
