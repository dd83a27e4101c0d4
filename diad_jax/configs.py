"""Configuration as frozen dataclasses (plain Python, no config framework).

`ModelConfig.sd15()` is the reference DiAD (SD v1.5 UNet, ldm KL-f8 VAE, SG network);
`ModelConfig.tiny()` is a small model with the same structure that runs quickly on a CPU.
Every derived quantity (SG residual channels, the SFF indices, the latent size) is computed
from these fields rather than hard-coded, so any consistent size works.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


def _tuple(x):
    return tuple(_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


@dataclass(frozen=True)
class UNetConfig:
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
        object.__setattr__(self, "channel_mult", _tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", _tuple(self.attention_resolutions))
        if len(self.channel_mult) < 2:
            raise ValueError(f"UNetConfig.channel_mult needs at least 2 levels (got {self.channel_mult}): "
                             "the SFF block fuses the two lowest resolutions")
        for level, mult in enumerate(self.channel_mult):
            ch = mult * self.model_channels
            if ch % self.norm_groups:
                raise ValueError(f"UNetConfig: level {level} has {ch} channels, not divisible by "
                                 f"norm_groups={self.norm_groups}")
            if (2 ** level) in self.attention_resolutions and ch % self.num_heads:
                raise ValueError(f"UNetConfig: level {level} has {ch} channels, not divisible by "
                                 f"num_heads={self.num_heads}")

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
class VAEConfig:
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
        object.__setattr__(self, "ch_mult", _tuple(self.ch_mult))
        for mult in self.ch_mult:
            if (mult * self.ch) % self.norm_groups:
                raise ValueError(f"VAEConfig: {mult * self.ch} channels not divisible by "
                                 f"norm_groups={self.norm_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class ModelConfig:
    """The whole DiAD model: UNet + SG network + VAE, plus the fixed text context's shape."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    hint_channels: int = 3
    # Hint encoder widths: conv in -> c0, then for each next width a conv and a stride-2 conv,
    # then a zero-initialised conv to model_channels (reference: 16, 32, 96, 256).
    hint_block_channels: tuple[int, ...] = (16, 32, 96, 256)
    # DiAD's modified meaning: only the three lowest-resolution decoder blocks get SG residuals
    # (plus the middle block). The released train.py/test.py use True; the yaml default is False.
    only_mid_control: bool = True
    scale_factor: float = 0.18215
    image_size: int = 256
    context_len: int = 77

    def __post_init__(self):
        object.__setattr__(self, "hint_block_channels", _tuple(self.hint_block_channels))
        hint_factor = 2 ** (len(self.hint_block_channels) - 1)
        if hint_factor != self.vae.downsample_factor:
            raise ValueError(
                f"ModelConfig: the hint encoder downsamples by {hint_factor} "
                f"(hint_block_channels={self.hint_block_channels}) but the VAE by "
                f"{self.vae.downsample_factor}; they must agree so the hint lands on the latent grid")
        if self.vae.embed_dim != self.unet.in_channels:
            raise ValueError(f"ModelConfig: vae.embed_dim={self.vae.embed_dim} != unet.in_channels="
                             f"{self.unet.in_channels}")
        lat = self.latent_size
        if self.image_size % self.vae.downsample_factor or lat % self.unet.downsample_factor:
            raise ValueError(f"ModelConfig: image_size={self.image_size} must be divisible by "
                             f"{self.vae.downsample_factor * self.unet.downsample_factor}")

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

    # ---- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"ModelConfig: unknown keys {sorted(unknown)}")
        if "unet" in d and isinstance(d["unet"], dict):
            d["unet"] = UNetConfig(**d["unet"])
        if "vae" in d and isinstance(d["vae"], dict):
            d["vae"] = VAEConfig(**d["vae"])
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "ModelConfig":
        return cls.from_dict(json.loads(s))


@dataclass(frozen=True)
class DiffusionConfig:
    """ldm DDPM schedule and the DDIM sampler used at inference (spec section 6)."""

    num_train_timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    ddim_steps: int = 10
    ddim_eta: float = 0.0
    # "official": noise to t=999 then DDIM 901..1 (the reference's behaviour);
    # "consistent": noise to the first DDIM timestep.
    schedule: str = "official"
    guidance_scale: float = 9.0

    def __post_init__(self):
        if self.schedule not in ("official", "consistent"):
            raise ValueError(f"DiffusionConfig.schedule must be 'official' or 'consistent', "
                             f"got {self.schedule!r}")
