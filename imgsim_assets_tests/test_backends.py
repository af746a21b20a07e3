"""The encoder's backends on a 2-block ViT-S/14: each one's vectors and patch tokens against
PyTorch eager's, the exported graphs cached by model, weights and input size and rebuilt when
one changes, auto's choice measured once and remembered, and what a backend cannot do refused."""

import json

import numpy as np
import pytest
import torch

from imgsim_assets.core import backends
from imgsim_assets.core.encoder import Encoder, EncoderSpec
from imgsim_assets.settings import Settings

SPEC = EncoderSpec(weights="random", depth=2)


@pytest.fixture
def graphs(tmp_path, monkeypatch):
    """A cache of its own for every test: what one exports, another does not find."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "imgsim" / "graphs"


def _pixels(n=6, size=56, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


@pytest.mark.parametrize("name", ["compile", "onnxruntime", "openvino"])
def test_each_backend_gives_the_vectors_and_patches_pytorch_gives(graphs, name):
    x = _pixels()
    vectors, patches = Encoder(SPEC, device="cpu").embed_with_patches(x)
    encoder = Encoder(SPEC, device="cpu", backend=name)
    got_vectors, got_patches = encoder.embed_with_patches(x)
    assert encoder.backend.name == name
    assert np.abs(got_vectors - vectors).max() <= backends.FIDELITY_MAX_ABS
    assert np.abs(got_patches - patches).max() <= backends.FIDELITY_MAX_ABS
    one = encoder.embed(x[:1])  # any batch size through the same graph
    assert np.abs(one - vectors[:1]).max() <= backends.FIDELITY_MAX_ABS
    if name == "openvino":  # the batch was shared among its streams, the single image ran in latency mode
        runner = encoder.backend._runners[56, 56]
        assert set(runner._compiled) == {"THROUGHPUT", "LATENCY"} and len(runner._local.LATENCY) == 1
        if runner.streams > 1:  # one request per stream, each with its share of the 6 images
            assert len(runner._local.THROUGHPUT) == runner.streams


def test_openvino_in_bfloat16_stays_close_to_float32(graphs):
    x = _pixels()
    expected = Encoder(SPEC, device="cpu").embed(x)
    got = Encoder(SPEC, device="cpu", dtype="bfloat16", backend="openvino").embed(x)
    assert np.min(np.sum(got * expected, axis=1)) > 0.999


def test_exported_graphs_are_cached_by_weights_and_input_size_and_rebuilt_when_one_changes(graphs, monkeypatch):
    x = _pixels()
    first = Encoder(SPEC, device="cpu", backend="onnxruntime")
    first.embed(x)
    [folder] = list(graphs.iterdir())
    graph = folder / "model.onnx"
    assert json.loads((folder / "identity.json").read_text())["size"] == [56, 56]
    written = graph.stat().st_mtime_ns

    exports = []
    real = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: exports.append(1) or real(*a, **k))
    again = Encoder(SPEC, device="cpu", backend="onnxruntime")
    assert np.array_equal(again.embed(x), first.embed(x))
    assert exports == [] and graph.stat().st_mtime_ns == written  # read from the cache

    again.embed(_pixels(size=70))  # another input size: its own graph
    other_weights = Encoder(EncoderSpec(weights="random", depth=1), device="cpu", backend="onnxruntime")
    other_weights.embed(x)  # another model: its own graph
    assert len(exports) == 2 and len([p for p in graphs.iterdir() if p.is_dir()]) == 3
    assert not [p for p in graphs.iterdir() if ".tmp-" in p.name]  # written whole, then renamed


def test_auto_picks_a_measured_backend_within_the_fidelity_bound_and_remembers_it(graphs, monkeypatch):
    x = _pixels(n=2)
    encoder = Encoder(SPEC, device="cpu", dtype="float32", backend="auto")
    vectors = encoder.embed(x)
    choice = encoder.backend_choice
    assert choice["backend"] == encoder.backend.name and choice["dtype"] == "float32"
    measured = choice["measured"]
    assert set(measured) == set(backends.BACKENDS) and measured["torch"]["max_abs_diff"] == 0.0
    assert all(m["images_per_second"] > 0 for m in measured.values())
    picked = measured[choice["backend"]]
    within = [m for m in measured.values() if m["max_abs_diff"] <= backends.FIDELITY_MAX_ABS]
    assert picked["images_per_second"] == max(m["images_per_second"] for m in within)
    assert np.abs(vectors - Encoder(SPEC, device="cpu").embed(x)).max() <= backends.FIDELITY_MAX_ABS

    monkeypatch.setattr(backends.Backend, "__call__", lambda *a: pytest.fail("measured again"), raising=True)
    remembered, built = backends.choose(encoder.model, encoder.graph_identity(), (56, 56))
    assert remembered == choice and built is None


def test_auto_in_bfloat16_judges_backends_by_cosine_against_float32_and_remembers_it_apart(graphs):
    x = _pixels(n=3)
    float32 = Encoder(SPEC, device="cpu", dtype="float32", backend="auto")
    float32.embed(x)
    encoder = Encoder(SPEC, device="cpu", dtype="bfloat16", backend="auto")
    vectors = encoder.embed(x)
    choice = encoder.backend_choice
    assert choice["dtype"] == "bfloat16" and choice["backend"] == encoder.backend.name != "onnxruntime"
    assert "float32 only" in choice["measured"]["onnxruntime"]["skipped"]
    ran = {n: m for n, m in choice["measured"].items() if "images_per_second" in m}
    assert set(ran) == {"torch", "compile", "openvino"}
    assert all(m["lowest_cosine"] >= backends.BF16_MIN_COSINE for m in ran.values())
    assert ran["torch"]["max_abs_diff"] > 0  # autocast computed in bf16, not float32
    assert ran[choice["backend"]]["images_per_second"] == max(m["images_per_second"] for m in ran.values())
    expected = Encoder(SPEC, device="cpu").embed(x)
    assert np.min(np.sum(vectors * expected, axis=1)) >= backends.BF16_MIN_COSINE
    assert len(list(graphs.glob("auto-*-bfloat16-*.json"))) == len(list(graphs.glob("auto-*-float32-*.json"))) == 1


def test_a_bfloat16_run_outside_the_bound_is_not_chosen(graphs, monkeypatch):
    monkeypatch.setattr(backends, "BF16_MIN_COSINE", 1.01)  # nothing in bf16 agrees that well
    with pytest.raises(RuntimeError, match="no encoder backend runs bfloat16 within its fidelity bound"):
        Encoder(SPEC, device="cpu", dtype="bfloat16", backend="auto").embed(_pixels(n=1))


def test_auto_precision_is_bfloat16_only_where_the_cpu_computes_it_and_the_backend_is_auto(tmp_path, monkeypatch):
    flags = tmp_path / "cpuinfo"
    flags.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert backends.native_bf16(flags, {})
    flags.write_text("flags\t\t: fpu sse2 avx2 fma\n")
    assert not backends.native_bf16(flags, {})
    assert not backends.native_bf16(tmp_path / "absent", {})
    flags.write_text("flags\t\t: fpu avx512f avx512_bf16\n")
    for isa, native in (("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True), ("ALL", True)):
        assert backends.native_bf16(flags, {"ONEDNN_MAX_CPU_ISA": isa}) is native  # oneDNN held below bf16

    for native in (True, False):
        monkeypatch.setattr(backends, "native_bf16", lambda native=native: native)
        assert Encoder(SPEC, device="cpu", backend="auto").dtype == (torch.bfloat16 if native else torch.float32)
        assert Encoder(SPEC, device="cpu", backend="openvino").dtype == torch.float32  # a named backend: fp32
        assert Encoder(SPEC, device="cpu", dtype="float32", backend="auto").dtype == torch.float32


def test_what_a_backend_cannot_do_is_refused():
    with pytest.raises(ValueError, match="unknown encoder backend 'tensorrt'"):
        Encoder(SPEC, device="cpu", backend="tensorrt")
    encoder = Encoder(SPEC, device="cpu", dtype="bfloat16", backend="onnxruntime")
    with pytest.raises(ValueError, match="onnxruntime backend runs float32 only"):
        encoder.embed(_pixels(n=1))


def test_the_product_default_is_auto_and_the_environment_chooses():
    assert Settings.from_env({}).encoder_backend == "auto"
    assert Settings.from_env({"IMGSIM_ENCODER_BACKEND": "openvino"}).encoder_backend == "openvino"
    assert Settings.from_env({}).encoder_dtype == "auto"
    assert Settings.from_env({"IMGSIM_ENCODER_DTYPE": "float32"}).encoder_dtype == "float32"
    assert Encoder.DEFAULTS["backend"] == "torch"  # code that builds an Encoder gets the reference
