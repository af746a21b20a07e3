import pytest
import timm
import torch
from safetensors.torch import save_file

from imgsim_assets.core import dinov2, weights
from imgsim_assets.core.dinov2 import load_dinov2


def _timm_reference(name: str, depth: int = 2) -> torch.nn.Module:
    timm_name = dinov2.TIMM_HUB_NAMES[name].split(".")[0]
    torch.manual_seed(1)
    model = timm.create_model(timm_name, pretrained=False, depth=depth, num_classes=0).eval()
    with torch.no_grad():  # make every parameter matter (timm zero-inits some)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _as_official(state: dict[str, torch.Tensor], embed_dim: int) -> dict[str, torch.Tensor]:
    """timm layout → the official release layout (what dinov2_*_pretrain.pth files contain)."""
    ours = dinov2.convert_timm_state_dict(dict(state), embed_dim)
    return {k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.") if "mlp" in k and embed_dim == 1536 else k: v
            for k, v in ours.items()}


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_timm_safetensors_give_timms_own_numbers(tmp_path, name):
    ref = _timm_reference(name)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = load_dinov2(name, weights=path, depth=2)
    x = torch.randn(2, 3, 518, 518)
    with torch.no_grad():
        expected = ref.forward_features(x)
        out = model.forward_features(x)
    r = model.num_register_tokens
    assert torch.allclose(out["x_norm_clstoken"], expected[:, 0], atol=1e-4)
    assert torch.allclose(out["x_norm_patchtokens"], expected[:, 1 + r :], atol=1e-4)
    assert out["x_norm_regtokens"].shape == (2, r, 384)


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_official_checkpoint_loads_strictly(tmp_path, name):
    ref = _timm_reference(name)
    path = tmp_path / dinov2.official_checkpoint_name(name)
    torch.save(_as_official(ref.state_dict(), 384), path)
    model = load_dinov2(name, weights=path, depth=2)
    x = torch.randn(1, 3, 518, 518)
    with torch.no_grad():
        assert torch.allclose(model(x), ref.forward_features(x)[:, 0], atol=1e-4)


def test_random_weights_are_seeded_and_shapes_follow_the_variant():
    a, b = load_dinov2("dinov2_vitb14", "random", depth=1), load_dinov2("dinov2_vitb14", "random", depth=1)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        fa, fb = a.forward_features(x), b.forward_features(x)
    assert torch.equal(fa["x_norm_clstoken"], fb["x_norm_clstoken"])
    assert fa["x_norm_clstoken"].shape == (1, 768)
    assert fa["x_norm_patchtokens"].shape == (1, 256, 768)


def test_non_square_multiple_of_14_and_bad_sizes():
    model = load_dinov2("dinov2_vits14", "random", depth=1)
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, 3, 140, 98))
        assert out["x_norm_patchtokens"].shape == (1, 10 * 7, 384)
        with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
            model.forward_features(torch.randn(1, 3, 100, 98))


def test_unknown_model_and_wrong_checkpoint_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown DINOv2 model 'dinov2_vitx14'"):
        load_dinov2("dinov2_vitx14", "random")
    small = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in _timm_reference("dinov2_vits14").state_dict().items()}, str(small))
    with pytest.raises(ValueError, match="wrong shapes"):
        load_dinov2("dinov2_vitb14", small, depth=2)
    with pytest.raises(ValueError, match="unexpected keys"):
        load_dinov2("dinov2_vits14", small, depth=1)
    junk = tmp_path / "junk.pth"
    torch.save({"foo": torch.zeros(1)}, junk)
    with pytest.raises(ValueError, match="not a DINOv2 checkpoint"):
        load_dinov2("dinov2_vits14", junk)


def test_auto_without_cached_weights_says_where_to_put_them(no_pretrained):
    with pytest.raises(FileNotFoundError) as e:
        load_dinov2("dinov2_vits14", "auto")
    message = str(e.value)
    assert "dinov2_vits14_pretrain.pth" in message and "hub/checkpoints" in message
    assert "vit_small_patch14_dinov2.lvd142m" in message and "random" in message


def test_auto_finds_the_torch_hub_checkpoint(no_pretrained):
    ref = _timm_reference("dinov2_vits14", depth=12)
    target = no_pretrained / "torch" / "hub" / "checkpoints" / "dinov2_vits14_pretrain.pth"
    target.parent.mkdir(parents=True)
    torch.save(_as_official(ref.state_dict(), 384), target)
    assert weights.resolve("dinov2_vits14", "auto") == str(target)
    model = load_dinov2("dinov2_vits14", "auto")
    assert torch.equal(model.blocks[11].attn.qkv.weight, ref.blocks[11].attn.qkv.weight)


@pytest.mark.parametrize("pooling, dim", [("cls", 384), ("mean", 384), ("cls+gem", 768)])
def test_pooling_gives_unit_vectors(pooling, dim):
    model = load_dinov2("dinov2_vits14", "random", depth=1)
    with torch.no_grad():
        v = dinov2.pool(model.forward_features(torch.randn(3, 3, 56, 56)), pooling)
    assert v.shape == (3, dim)
    assert torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-5)


HUBCONF = '''
"""Stands in for a clone of facebookresearch/dinov2: its hubconf returns official-layout models."""
import os

import torch

from imgsim_assets.core import dinov2

dependencies = ["torch"]


def dinov2_vits14(pretrained=True, **kwargs):
    model = dinov2.DinoVisionTransformer(dinov2.VARIANTS["dinov2_vits14"], depth=2)
    if pretrained:
        path = os.path.join(os.path.dirname(__file__), "dinov2_vits14_pretrain.pth")
        model.load_state_dict(torch.load(path, weights_only=True))
    return model


def dinov2_vitb14(pretrained=True, **kwargs):
    raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
'''


def test_local_clone_of_the_official_repo_loads_through_torch_hub(tmp_path):
    repo = tmp_path / "dinov2"
    repo.mkdir()
    (repo / "hubconf.py").write_text(HUBCONF)
    ref = _timm_reference("dinov2_vits14")
    torch.save(_as_official(ref.state_dict(), 384), repo / "dinov2_vits14_pretrain.pth")

    assert weights.resolve("dinov2_vits14", repo) == str(repo.resolve())
    model = load_dinov2("dinov2_vits14", weights=repo, depth=2)
    x = torch.randn(1, 3, 518, 518)
    with torch.no_grad():
        assert torch.allclose(model(x), ref.forward_features(x)[:, 0], atol=1e-4)

    with pytest.raises(RuntimeError, match=r"source='local'\) failed: OSError(.|\n)*dinov2_vitb14_pretrain\.pth in .*checkpoints"):
        load_dinov2("dinov2_vitb14", weights=repo, depth=2)
    with pytest.raises(ValueError, match=r"torch hub repo .* does not fit this model: unexpected keys \['blocks\.1\."):
        load_dinov2("dinov2_vits14", weights=repo, depth=1)


def test_check_weights_finds_what_loading_would_fail_on_without_loading(tmp_path, no_pretrained):
    ref = _timm_reference("dinov2_vits14")
    official = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(_as_official(ref.state_dict(), 384), official)
    assert weights.check("dinov2_vits14", official, depth=2) == str(official.resolve())
    assert weights.check("dinov2_vits14", "random") == "random"
    with pytest.raises(ValueError, match="wrong shapes"):
        weights.check("dinov2_vitb14", official, depth=2)
    with pytest.raises(ValueError, match="missing keys"):
        weights.check("dinov2_vits14", official)  # 12 blocks expected, the file has 2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        weights.check("dinov2_vits14", tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="no weights for dinov2_vits14 in the caches, and offline"):
        weights.check("dinov2_vits14", "auto")
    with pytest.raises(ValueError, match="unknown DINOv2 model"):
        weights.check("dinov2_vitx14", "random")
