"""The DINOv2 models as data: the variants' architecture, the official release file names,
timm's copies on the Hugging Face hub, the poolings by name, and :class:`EncoderSpec`. No
torch here: reading settings, finding and fetching weights, and saying that none can be had
must not wait seconds for torch to import."""

from __future__ import annotations

from dataclasses import asdict, dataclass

PATCH_SIZE = 14
PRETRAIN_IMG_SIZE = 518
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_SEED = 0


@dataclass(frozen=True)
class Variant:
    embed_dim: int
    depth: int
    num_heads: int
    swiglu: bool = False
    registers: int = 0

    @property
    def interpolate_offset(self) -> float:
        # Official hub models: the plain ones scale by (grid + 0.1) / M without antialias,
        # the register ones interpolate to the target size with antialias.
        return 0.0 if self.registers else 0.1

    @property
    def interpolate_antialias(self) -> bool:
        return bool(self.registers)


_BASE = {
    "dinov2_vits14": Variant(384, 12, 6),
    "dinov2_vitb14": Variant(768, 12, 12),
    "dinov2_vitl14": Variant(1024, 24, 16),
    "dinov2_vitg14": Variant(1536, 40, 24, swiglu=True),
}
VARIANTS: dict[str, Variant] = {
    **_BASE,
    **{f"{name}_reg": Variant(v.embed_dim, v.depth, v.num_heads, v.swiglu, registers=4) for name, v in _BASE.items()},
}

# timm's copies of the official weights on the Hugging Face hub (``weights="auto"``).
TIMM_HUB_NAMES = {
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_vitl14": "vit_large_patch14_dinov2.lvd142m",
    "dinov2_vitg14": "vit_giant_patch14_dinov2.lvd142m",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitg14_reg": "vit_giant_patch14_reg4_dinov2.lvd142m",
}


def official_checkpoint_name(name: str) -> str:
    """File name of the official release checkpoint, e.g. ``dinov2_vits14_reg4_pretrain.pth``."""
    return f"{name}4_pretrain.pth" if name.endswith("_reg") else f"{name}_pretrain.pth"


# Poolings by name and width (the vector's dimension in multiples of the model's); what each
# computes is :data:`dinov2.POOLINGS`.
POOLING_WIDTHS = {"cls": 1, "mean": 1, "cls+gem": 2}


def pooled_dim(embed_dim: int, pooling: str) -> int:
    return POOLING_WIDTHS[pooling] * embed_dim


@dataclass(frozen=True)
class EncoderSpec:
    """Everything that decides what vector an image gets. Recorded with every vector."""

    model: str = "dinov2_vits14"
    weights: str = "auto"
    pooling: str = "cls"
    depth: int | None = None

    def __post_init__(self) -> None:
        if self.model not in VARIANTS:
            raise ValueError(f"unknown DINOv2 model {self.model!r}; choose one of {', '.join(VARIANTS)}")
        if self.pooling not in POOLING_WIDTHS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of {', '.join(POOLING_WIDTHS)}")

    @property
    def dim(self) -> int:
        return pooled_dim(VARIANTS[self.model].embed_dim, self.pooling)

    def describe(self) -> dict:
        return asdict(self)


# How an encoder runs (not what it computes: that is the spec). The one place these defaults
# are written; the Encoder, the Dagster resource and the settings take them from here.
# ``backend``: where the forward pass runs (core.backends). Code that builds an Encoder gets
# PyTorch eager, the reference; the product's settings default to ``auto`` (PRODUCT_BACKEND).
RUN_DEFAULTS = {"device": "auto", "dtype": "auto", "batch_size": 64, "compile": False, "backend": "torch"}
PRODUCT_BACKEND = "auto"
