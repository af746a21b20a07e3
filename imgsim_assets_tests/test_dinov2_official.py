"""Our DINOv2 against an independent re-implementation of the official forward pass.

The reference below follows facebookresearch/dinov2 (``DinoVisionTransformer.prepare_tokens_with_masks``,
``interpolate_pos_encoding``, ``NestedTensorBlock``) with plain tensor ops and reads weights in the
official key layout, so it checks both the key mapping and the run-time position interpolation.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from imgsim_assets.core import dinov2
from imgsim_assets.core.dinov2 import load_dinov2


def _official_interpolate(pos_embed, h, w, patch, offset, antialias):
    n = pos_embed.shape[1] - 1
    h0, w0 = h // patch, w // patch
    if h0 * w0 == n and h == w:
        return pos_embed
    m = int(math.sqrt(n))
    grid = pos_embed[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    kwargs = {"scale_factor": ((h0 + offset) / m, (w0 + offset) / m)} if offset else {"size": (h0, w0)}
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **kwargs)
    return torch.cat((pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)), dim=1)


def _official_forward(sd, x, heads, registers, offset, antialias):
    b, _, h, w = x.shape
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    t = torch.cat((sd["cls_token"].expand(b, -1, -1), t), dim=1)
    t = t + _official_interpolate(sd["pos_embed"], h, w, 14, offset, antialias)
    if registers:
        t = torch.cat((t[:, :1], sd["register_tokens"].expand(b, -1, -1), t[:, 1:]), dim=1)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = lambda name: sd[f"blocks.{i}.{name}"]  # noqa: E731
        y = F.layer_norm(t, t.shape[-1:], p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        qkv = F.linear(y, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(b, t.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * qkv.shape[-1] ** -0.5, qkv[1], qkv[2]
        a = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        y = (a @ v).transpose(1, 2).reshape(b, t.shape[1], -1)
        t = t + p("ls1.gamma") * F.linear(y, p("attn.proj.weight"), p("attn.proj.bias"))
        y = F.layer_norm(t, t.shape[-1:], p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        t = t + p("ls2.gamma") * y
    t = F.layer_norm(t, t.shape[-1:], sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return {"x_norm_clstoken": t[:, 0], "x_norm_patchtokens": t[:, 1 + registers :]}


def _official_random_state(name, depth, seed=0):
    """Random weights in the official release layout, every tensor non-trivial."""
    g = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in load_dinov2(name, "random", depth=depth).state_dict().items()}
    return {k: torch.randn(s, generator=g) * (0.02 if len(s) > 1 else 0.1) + (1.0 if k.endswith(".weight") and len(s) == 1 else 0.0)
            for k, s in shapes.items()}


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
@pytest.mark.parametrize("size", [(224, 224), (140, 98), (98, 210), (518, 518)])
def test_forward_features_match_the_official_computation(tmp_path, name, size):
    variant = dinov2.VARIANTS[name]
    sd = _official_random_state(name, depth=2)
    path = tmp_path / dinov2.official_checkpoint_name(name)
    torch.save(sd, path)
    model = load_dinov2(name, weights=path, depth=2)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.forward_features(x)
        ref = _official_forward(sd, x, variant.num_heads, variant.registers,
                                variant.interpolate_offset, variant.interpolate_antialias)
    for key in ("x_norm_clstoken", "x_norm_patchtokens"):
        assert ours[key].shape == ref[key].shape
        assert (ours[key] - ref[key]).abs().max().item() < 1e-4, key


def test_plain_and_register_models_interpolate_differently():
    pos = torch.randn(1, 1 + 37 * 37, 8)
    plain = _official_interpolate(pos, 224, 224, 14, 0.1, False)
    reg = _official_interpolate(pos, 224, 224, 14, 0.0, True)
    assert plain.shape == reg.shape == (1, 1 + 16 * 16, 8)
    assert (plain - reg).abs().max() > 1e-3  # the distinction matters numerically
