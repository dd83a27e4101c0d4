"""The model's architecture: the UNet, the VAE, and the whole DiAD model around them.

`ModelConfig.sd15()` is the reference DiAD (SD v1.5 UNet, ldm KL-f8 VAE, SG network);
`ModelConfig.tiny()` is a small model with the same structure that runs quickly on a CPU.
Every derived quantity (SG residual channels, the SFF indices, the latent size) is computed
from these fields rather than hard-coded, so any consistent size works.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from diad_jax.configs.checks import require_choice
from diad_jax.configs.constants import FUSIONS
from diad_jax.configs.serialization import Section, as_tuple
from diad_jax.errors import ConfigError


@dataclass(frozen=True)
class UNetConfig(Section):
    """The ldm `UNetModel` as configured by DiAD (use_spatial_transformer=True, legacy=False)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Downsampling factors ("ds") at which a SpatialTransformer follows each res block.
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int = 8
    transformer_depth: int = 1
    context_dim: int = 768
    norm_groups: int = 32

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", as_tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", as_tuple(self.attention_resolutions))
        if len(self.channel_mult) < 2:
            raise ConfigError(f"{{0}} needs at least 2 levels (got {self.channel_mult}): the SFF block fuses the "
                              f"two lowest resolutions", fields=["channel_mult"])
        for level, mult in enumerate(self.channel_mult):
            ch = mult * self.model_channels
            if ch % self.norm_groups:
                raise ConfigError(f"level {level} has {ch} channels ({{0}}[{level}] x {{1}}), not divisible by "
                                  f"{{2}}={self.norm_groups}", fields=["channel_mult", "model_channels", "norm_groups"])
            if (2 ** level) in self.attention_resolutions and ch % self.num_heads:
                raise ConfigError(f"level {level} has {ch} channels ({{0}}[{level}] x {{1}}), not divisible by "
                                  f"{{2}}={self.num_heads} (the level has attention: {{3}})",
                                  fields=["channel_mult", "model_channels", "num_heads", "attention_resolutions"])

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    def level_channels(self, level: int) -> int:
        return self.channel_mult[level] * self.model_channels

    def has_attention(self, level: int) -> bool:
        return (2 ** level) in self.attention_resolutions

    def skip_channels(self) -> tuple[int, ...]:
        """Channels of the encoder outputs (ldm `input_block_chans`): one per input block."""
        chans = [self.model_channels]
        ch = self.model_channels
        for level in range(self.num_levels):
            for _ in range(self.num_res_blocks):
                ch = self.level_channels(level)
                chans.append(ch)
            if level != self.num_levels - 1:
                chans.append(ch)
        return tuple(chans)

    def skip_levels(self) -> tuple[int, ...]:
        """Resolution level (0 = full latent size) of each encoder output."""
        levels = [0]
        for level in range(self.num_levels):
            levels += [level] * self.num_res_blocks
            if level != self.num_levels - 1:
                levels.append(level + 1)
        return tuple(levels)

    @property
    def num_skips(self) -> int:
        return len(self.skip_channels())

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.num_levels - 1)


@dataclass(frozen=True)
class VAEConfig(Section):
    """The ldm KL autoencoder (`ddconfig`); attention only in the mid block."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", as_tuple(self.ch_mult))
        for level, mult in enumerate(self.ch_mult):
            if (mult * self.ch) % self.norm_groups:
                raise ConfigError(f"level {level} has {mult * self.ch} channels ({{0}}[{level}] x {{1}}), not "
                                  f"divisible by {{2}}={self.norm_groups}", fields=["ch_mult", "ch", "norm_groups"])

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class ModelConfig(Section):
    """The whole DiAD model: UNet + SG network + VAE, plus the fixed text context's shape."""

    SECTIONS = {"unet": UNetConfig, "vae": VAEConfig}

    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    hint_channels: int = 3
    # Hint encoder widths: conv in -> c0, then for each next width a conv and a stride-2 conv,
    # then a zero-initialised conv to model_channels (reference: 16, 32, 96, 256).
    hint_block_channels: tuple[int, ...] = (16, 32, 96, 256)
    # DiAD's modified meaning: only the three lowest-resolution decoder blocks get SG residuals
    # (plus the middle block). The released train.py/test.py use True; the yaml default is False.
    only_mid_control: bool = True
    fusion: str = "sff"  # one of constants.FUSIONS; checkpoints written before this field existed used "sff"
    scale_factor: float = 0.18215
    image_size: int = 256
    context_len: int = 77

    def __post_init__(self):
        object.__setattr__(self, "hint_block_channels", as_tuple(self.hint_block_channels))
        require_choice(self, "fusion", FUSIONS)
        hint_factor = 2 ** (len(self.hint_block_channels) - 1)
        if hint_factor != self.vae.downsample_factor:
            raise ConfigError(
                f"the hint encoder downsamples by {hint_factor} ({{0}}={self.hint_block_channels}) but the VAE by "
                f"{self.vae.downsample_factor} ({{1}}={self.vae.ch_mult}); they must agree so the hint lands on the "
                f"latent grid", fields=["hint_block_channels", "vae.ch_mult"])
        if self.vae.embed_dim != self.unet.in_channels:
            raise ConfigError(f"{{0}}={self.vae.embed_dim} != {{1}}={self.unet.in_channels}",
                              fields=["vae.embed_dim", "unet.in_channels"])
        factor = self.vae.downsample_factor * self.unet.downsample_factor
        if self.image_size % factor:
            raise ConfigError(f"{{0}}={self.image_size} must be divisible by {factor}, the downsampling of the VAE "
                              f"({{1}}={self.vae.ch_mult}) times that of the UNet ({{2}}={self.unet.channel_mult})",
                              fields=["image_size", "vae.ch_mult", "unet.channel_mult"])

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.unet.in_channels

    # ---- SFF geometry (spec section 2), derived instead of hard-coded -------------------------
    def sff_sources(self) -> tuple[int, ...]:
        """Indices of the SG residuals at the second-lowest resolution (reference: 6, 7, 8)."""
        levels = self.unet.skip_levels()
        target = self.unet.num_levels - 2
        return tuple(i for i, lv in enumerate(levels) if lv == target)

    def sff_targets(self) -> tuple[int, ...]:
        """Indices of the SG residuals at the lowest resolution (reference: 9, 10, 11)."""
        levels = self.unet.skip_levels()
        target = self.unet.num_levels - 1
        return tuple(i for i, lv in enumerate(levels) if lv == target)

    @classmethod
    def sd15(cls, **overrides) -> "ModelConfig":
        """The reference sizes: SD v1.5 UNet, KL-f8 VAE, 256x256 images, 32x32x4 latents."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "ModelConfig":
        """Same structure, small sizes: 64x64 images, 8x8x4 latents, 32/64 channels, 2 levels."""
        kw: dict[str, Any] = dict(
            unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=2,
                            attention_resolutions=(2,), num_heads=4, context_dim=64),
            vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
            hint_block_channels=(16, 32, 32, 64),
            image_size=64,
            context_len=8,
        )
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def demo(cls, **overrides) -> "ModelConfig":
        """The embedded default that `make demo` trains from scratch on CPU: `tiny()` with a
        4x-downsampling VAE (16/32/32 channels, 16x16x4 latents of 64x64 images) and a hint encoder
        downsampling 4x to match. A from-scratch VAE must be trained first; its latent std then
        sets `scale_factor` (ldm's scale_by_std)."""
        kw: dict[str, Any] = dict(
            vae=VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8),
            hint_block_channels=(16, 32, 64),
        )
        kw.update(overrides)
        return cls.tiny(**kw)

    @classmethod
    def from_spec(cls, spec: str, field: str = "model") -> "ModelConfig":
        """'sd15', 'tiny', 'demo', or a JSON file holding a ModelConfig (or a checkpoint's
        model_config.json); errors name `field`, the config field or argument the spec came from."""
        if spec in ("sd15", "tiny", "demo"):
            return getattr(cls, spec)()
        try:
            with open(spec) as f:
                d = json.load(f)
            return cls.from_dict(d.get("model_config", d))
        except FileNotFoundError as e:
            raise ConfigError(f"{{0}} {spec}: neither 'sd15', 'tiny', 'demo' nor an existing ModelConfig JSON "
                              f"file", fields=[field]) from e
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise ConfigError(f"{{0}} {spec}: not a ModelConfig JSON file ({e})", fields=[field]) from e
