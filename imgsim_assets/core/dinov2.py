"""DINOv2 ViTs with the official numerics, built from timm's layers.

The module keeps the official parameter layout (``cls_token``, ``pos_embed`` over a 37×37
grid plus the class position, ``register_tokens``, ``mask_token``, ``blocks.N.*``) so an
official release checkpoint loads strictly, and it interpolates position embeddings at run
time exactly as the official code does. timm checkpoints are converted into this layout by
:func:`convert_timm_state_dict`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import Mlp, PatchEmbed, SwiGLUPacked
from timm.models.vision_transformer import Block

from imgsim_assets.core.weights import is_hub_repo  # noqa: F401  (re-exported)
from imgsim_assets.core.models import (  # noqa: F401  (the model's vocabulary, re-exported)
    IMAGENET_MEAN, IMAGENET_STD, PATCH_SIZE, POOLING_WIDTHS, PRETRAIN_IMG_SIZE, RANDOM_SEED, TIMM_HUB_NAMES,
    VARIANTS, Variant, official_checkpoint_name, pooled_dim,
)  # fmt: skip


class DinoVisionTransformer(nn.Module):
    """A DINOv2 ViT whose ``forward_features`` returns the official output dict."""

    def __init__(self, variant: Variant, depth: int | None = None) -> None:
        super().__init__()
        self.variant = variant
        dim = variant.embed_dim
        self.patch_size = PATCH_SIZE
        self.embed_dim = dim
        self.num_register_tokens = variant.registers
        grid = PRETRAIN_IMG_SIZE // PATCH_SIZE
        self.patch_embed = PatchEmbed(
            img_size=PRETRAIN_IMG_SIZE, patch_size=PATCH_SIZE, in_chans=3, embed_dim=dim, strict_img_size=False
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, variant.registers, dim)) if variant.registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, dim))  # used in training only; kept for strict loading
        mlp = dict(mlp_ratio=2.66667 * 2, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU) if variant.swiglu else dict(
            mlp_ratio=4.0, mlp_layer=Mlp, act_layer=nn.GELU
        )
        self.blocks = nn.ModuleList(
            Block(dim, variant.num_heads, qkv_bias=True, init_values=1e-5, norm_layer=partial(nn.LayerNorm, eps=1e-6), **mlp)
            for _ in range(depth or variant.depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def interpolate_pos_encoding(self, num_patches: int, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        n = self.pos_embed.shape[1] - 1
        if num_patches == n and height == width:
            return self.pos_embed.to(dtype)
        pos = self.pos_embed.float()
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        m = int(math.sqrt(n))
        h0, w0 = height // self.patch_size, width // self.patch_size
        grid = patch_pos.reshape(1, m, m, -1).permute(0, 3, 1, 2)
        if self.variant.interpolate_offset:
            scale = ((h0 + self.variant.interpolate_offset) / m, (w0 + self.variant.interpolate_offset) / m)
            grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=self.variant.interpolate_antialias)
        else:
            grid = F.interpolate(grid, size=(h0, w0), mode="bicubic", antialias=self.variant.interpolate_antialias)
        assert grid.shape[-2:] == (h0, w0), (grid.shape, h0, w0)
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)
        return torch.cat((cls_pos, patch_pos), dim=1).to(dtype)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(b, -1, -1).to(x.dtype), x), dim=1)
        x = x + self.interpolate_pos_encoding(x.shape[1] - 1, h, w, x.dtype)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(b, -1, -1).to(x.dtype), x[:, 1:]), dim=1)
        return x

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.prepare_tokens(x)
        for block in self.blocks:
            x = block(x)
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x,
            "masks": None,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["x_norm_clstoken"]


def _init_random(model: DinoVisionTransformer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and not name.endswith("mask_token"):
                p.copy_(torch.nn.init.trunc_normal_(torch.empty_like(p), std=0.02, generator=generator))
            elif name.endswith(".bias"):
                p.zero_()
        model.cls_token.copy_(torch.randn(model.cls_token.shape, generator=generator) * 1e-6)


def convert_official_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DINOv2 release layout → this module's layout (only the SwiGLU names differ)."""
    out = {}
    for k, v in state_dict.items():
        k = k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out[k] = v
    return out


def convert_timm_state_dict(state_dict: dict[str, torch.Tensor], embed_dim: int) -> dict[str, torch.Tensor]:
    """timm ``vit_*_patch14_dinov2`` layout → this module's (official) layout.

    timm's register models fold the class position into ``cls_token`` and keep only patch
    positions in ``pos_embed``; adding a zero class position restores the official sum.
    """
    out = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    if "reg_token" in out:
        out["register_tokens"] = out.pop("reg_token")
        pos = out["pos_embed"]
        out["pos_embed"] = torch.cat((torch.zeros_like(pos[:, :1]), pos), dim=1)
    out.setdefault("mask_token", torch.zeros(1, embed_dim))
    return out


def _is_safetensors(path: Path) -> bool:
    """By content, not name (the Hugging Face cache names files by their hash): an 8-byte
    little-endian header length, then the JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def read_checkpoint(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The state dict in ``path``; ``mmap`` maps the tensors instead of reading them (to look
    at names and shapes only)."""
    if _is_safetensors(path):
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError:
        if not mmap:
            raise
        state = torch.load(path, map_location="cpu", weights_only=True)  # legacy format cannot be mapped
    for key in ("model", "state_dict", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def load_state_dict_file(model: DinoVisionTransformer, path: str | os.PathLike) -> None:
    """Load an official ``.pth`` or a timm ``.safetensors`` checkpoint, strictly."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DINOv2 checkpoint {path} does not exist")
    load_state_dict(model, read_checkpoint(path), source=f"checkpoint {path}")


def load_state_dict(model: DinoVisionTransformer, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights in the official or timm layout, strictly, naming every mismatch."""
    model.load_state_dict(fitting_state(model, state, source), strict=True)


def fitting_state(model: DinoVisionTransformer, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``state`` in this module's layout, or a ValueError naming every missing, unexpected and
    mis-shaped key. Looks at names and shapes only (``model`` may live on the meta device)."""
    if "mask_token" in state:
        state = convert_official_state_dict(state)
    elif "cls_token" in state and "blocks.0.attn.qkv.weight" in state:
        state = convert_timm_state_dict(state, model.embed_dim)
    else:
        sample = ", ".join(list(state)[:5])
        raise ValueError(f"{source} is not a DINOv2 checkpoint in the official or timm layout (keys: {sample}, ...)")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
        if wrong:
            parts.append(f"wrong shapes {wrong[:4]}")
        raise ValueError(f"{source} does not fit this model: " + "; ".join(parts))
    return state


def load_from_hub_repo(model: DinoVisionTransformer, repo_dir: str | os.PathLike, name: str) -> None:
    """Weights of ``name`` from ``torch.hub.load(repo_dir, name, source="local")``.

    The official hubconf fetches the release checkpoint through torch hub's cache, so offline
    it needs the file in ``$TORCH_HOME/hub/checkpoints``; its model is only used as a source
    of weights, the forward pass is this module's.
    """
    repo_dir = str(Path(repo_dir).expanduser().resolve())
    try:
        hub_model = torch.hub.load(repo_dir, name, source="local", pretrained=True)
    except Exception as e:  # the hubconf is user code: any failure is reported the same way
        raise RuntimeError(
            f"torch.hub.load({repo_dir!r}, {name!r}, source='local') failed: {type(e).__name__}: {e}\n"
            f"Offline, the official hubconf needs {official_checkpoint_name(name)} in "
            f"{torch.hub.get_dir()}/checkpoints/ (or pass that file as the weights instead)."
        ) from e
    if not isinstance(hub_model, nn.Module):
        raise TypeError(f"{repo_dir}/hubconf.py:{name} returned {type(hub_model).__name__}, not a torch module")
    load_state_dict(model, hub_model.state_dict(), source=f"torch hub repo {repo_dir} ({name})")


def load_dinov2(name: str = "dinov2_vits14", weights: str | os.PathLike = "auto", depth: int | None = None) -> DinoVisionTransformer:
    """Build a DINOv2 ViT in eval mode.

    ``weights``: a path to an official ``.pth`` or timm ``.safetensors`` checkpoint; a local
    clone of the official repository (a folder with ``hubconf.py``, loaded through
    ``torch.hub.load(dir, name, source="local")``); ``"auto"`` for the cached official weights,
    fetched on first use (:mod:`weights`); ``"random"`` for seeded random weights of the same
    architecture. ``depth`` builds fewer blocks (tests).
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown DINOv2 model {name!r}; choose one of {', '.join(VARIANTS)}")
    model = DinoVisionTransformer(VARIANTS[name], depth=depth)
    if str(weights) == "random":
        _init_random(model, RANDOM_SEED)
    elif is_hub_repo(weights):
        load_from_hub_repo(model, weights, name)
    else:
        if str(weights) == "auto":
            from imgsim_assets.core.weights import resolve

            weights = resolve(name, "auto")
        load_state_dict_file(model, Path(weights).expanduser())
    return model.eval()


@dataclass(frozen=True)
class Pooling:
    """How ``forward_features`` output becomes one vector per image (before L2-normalisation)."""

    pool: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (CLS B×D, patch tokens B×N×D) → B×(width·D)
    width: int = 1  # the vector's dimension in multiples of the model's
    description: str = ""


def _gem(patches: torch.Tensor, p: float = 4.0) -> torch.Tensor:
    return patches.clamp(min=1e-6).pow(p).mean(dim=1).pow(1.0 / p)


POOLINGS = {
    "cls": Pooling(lambda cls, patches: cls, POOLING_WIDTHS["cls"], "the normalised CLS token"),
    "mean": Pooling(lambda cls, patches: patches.mean(dim=1), POOLING_WIDTHS["mean"],
                    "the mean of the patch tokens (the seed article's)"),
    "cls+gem": Pooling(lambda cls, patches: torch.cat((F.normalize(cls, dim=-1), F.normalize(_gem(patches), dim=-1)),
                                                      dim=-1), POOLING_WIDTHS["cls+gem"],
                       "CLS and GeM (p=4) of the patch tokens, concatenated"),
}


def pool(features: dict[str, torch.Tensor], pooling: str = "cls") -> torch.Tensor:
    """One L2-normalised vector per image from ``forward_features`` output."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    v = POOLINGS[pooling].pool(features["x_norm_clstoken"].float(), features["x_norm_patchtokens"].float())
    return F.normalize(v, dim=-1)

