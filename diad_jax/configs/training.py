"""Configuration as frozen dataclasses (plain Python, no config framework).

`ModelConfig.sd15()` is the reference DiAD (SD v1.5 UNet, ldm KL-f8 VAE, SG network);
`ModelConfig.tiny()` is a small model with the same structure that runs quickly on a CPU.
Every derived quantity (SG residual channels, the SFF indices, the latent size) is computed
from these fields rather than hard-coded, so any consistent size works.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from diad_jax.errors import ConfigError

log = logging.getLogger(__name__)

# The reference's anomaly-map blur sigma and image-score max-pool window, both for its 256 px maps
# (EvalConfig.scaled_footprint scales them to other sizes).
REFERENCE_MAP_SIZE = 256
REFERENCE_SIGMA = 5.0
REFERENCE_POOL_WINDOW = 8

# The reference's input normalisation (ImageNet mean and std per RGB channel): model inputs are
# (x / 255 - mean) / std, NCHW.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The dataset builders of diad_jax.data (named here so a config can be checked without importing them).
DATASETS = ("mvtec_ad", "mvtec_ad_2", "visa", "real_iad", "folder", "synthetic")


def _tuple(x):
    return tuple(_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _check_finite(owner: str, **values: float) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ConfigError(f"{owner}.{name} must be a finite number, got {v!r}")


def _check_ints(owner: str, obj, names: tuple[str, ...], minimum: int = 1) -> None:
    """Each named field of `obj` is an integer >= minimum."""
    for name in names:
        v = getattr(obj, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ConfigError(f"{owner}.{name} must be >= {minimum} (an integer), got {v!r}")


def _check_choice(owner: str, obj, name: str, allowed: tuple) -> None:
    if getattr(obj, name) not in allowed:
        raise ConfigError(f"{owner}.{name} must be one of {allowed}, got {getattr(obj, name)!r}")


class _Section:
    """Serialisation shared by the config dataclasses: `to_dict` / `to_json`, and `from_dict` /
    `from_json` that build nested sections and name unknown keys and values of the wrong kind as
    `<where>.<key>`."""

    # {field name: config class} of the fields that are sections themselves
    SECTIONS: dict[str, type] = {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, s: str):
        return cls.from_dict(json.loads(s))

    @classmethod
    def _unknown_keys(cls, d: dict, where: str) -> list[tuple[str, set, set]]:
        """(where, unknown keys, known keys) of `d` and of every section in it: all of them, so
        that one error names every key a file gets wrong."""
        known = {f.name for f in dataclasses.fields(cls)}
        found = [(where, set(d) - known, known)] if set(d) - known else []
        for k, v in d.items():
            if k in cls.SECTIONS and isinstance(v, dict):
                found += cls.SECTIONS[k]._unknown_keys(v, f"{where}.{k}")
        return found

    @classmethod
    def from_dict(cls, d: dict, where: str | None = None):
        where = where or cls.__name__
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a mapping of fields, got {d!r}")
        unknown = cls._unknown_keys(d, where)
        if unknown:
            raise ConfigError("; ".join(f"{w}: unknown keys {sorted(keys)} (known: {sorted(known)})"
                                        for w, keys, known in unknown))
        d = {k: (cls.SECTIONS[k].from_dict(v, f"{where}.{k}") if k in cls.SECTIONS and isinstance(v, dict) else v)
             for k, v in d.items()}
        try:
            return cls(**d)
        except TypeError as e:  # a value of the wrong kind, e.g. a string where a number goes
            raise ConfigError(f"{where}: {e}") from e


@dataclass(frozen=True)
class UNetConfig(_Section):
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
            raise ConfigError(f"UNetConfig.channel_mult needs at least 2 levels (got {self.channel_mult}): "
                              "the SFF block fuses the two lowest resolutions")
        for level, mult in enumerate(self.channel_mult):
            ch = mult * self.model_channels
            if ch % self.norm_groups:
                raise ConfigError(f"UNetConfig: level {level} has {ch} channels, not divisible by "
                                  f"norm_groups={self.norm_groups}")
            if (2 ** level) in self.attention_resolutions and ch % self.num_heads:
                raise ConfigError(f"UNetConfig: level {level} has {ch} channels, not divisible by "
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
class VAEConfig(_Section):
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
                raise ConfigError(f"VAEConfig: {mult * self.ch} channels not divisible by "
                                  f"norm_groups={self.norm_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


# The SG network's fusion block (models/sg_network.py): the reference's Spatial-aware Feature Fusion,
# or none (the residuals pass unchanged; no fusion params).
FUSIONS = ("sff", "none")


@dataclass(frozen=True)
class ModelConfig(_Section):
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
    fusion: str = "sff"  # one of FUSIONS; checkpoints written before this field existed used "sff"
    scale_factor: float = 0.18215
    image_size: int = 256
    context_len: int = 77

    def __post_init__(self):
        object.__setattr__(self, "hint_block_channels", _tuple(self.hint_block_channels))
        if self.fusion not in FUSIONS:
            raise ConfigError(f"ModelConfig.fusion must be one of {FUSIONS}, got {self.fusion!r}")
        hint_factor = 2 ** (len(self.hint_block_channels) - 1)
        if hint_factor != self.vae.downsample_factor:
            raise ConfigError(
                f"ModelConfig: the hint encoder downsamples by {hint_factor} "
                f"(hint_block_channels={self.hint_block_channels}) but the VAE by "
                f"{self.vae.downsample_factor}; they must agree so the hint lands on the latent grid")
        if self.vae.embed_dim != self.unet.in_channels:
            raise ConfigError(f"ModelConfig: vae.embed_dim={self.vae.embed_dim} != unet.in_channels="
                              f"{self.unet.in_channels}")
        lat = self.latent_size
        if self.image_size % self.vae.downsample_factor or lat % self.unet.downsample_factor:
            raise ConfigError(f"ModelConfig: image_size={self.image_size} must be divisible by "
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
    def from_spec(cls, spec: str, flag: str = "--model") -> "ModelConfig":
        """'sd15', 'tiny', 'demo', or a JSON file holding a ModelConfig (or a checkpoint's
        model_config.json); errors name `flag`, the command-line option the spec came from."""
        if spec in ("sd15", "tiny", "demo"):
            return getattr(cls, spec)()
        try:
            with open(spec) as f:
                d = json.load(f)
            return cls.from_dict(d.get("model_config", d))
        except FileNotFoundError as e:
            raise ConfigError(f"{flag} {spec}: neither 'sd15', 'tiny', 'demo' nor an existing ModelConfig JSON "
                              f"file") from e
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise ConfigError(f"{flag} {spec}: not a ModelConfig JSON file ({e})") from e


def uniform_timesteps(num_train_timesteps: int, ddim_steps: int) -> range:
    """ldm's 'uniform' DDIM discretisation: range(0, T, T // S) + 1 -> 1, 101, ..., 901 (ascending)."""
    return range(1, num_train_timesteps + 1, num_train_timesteps // ddim_steps)


def spaced_timesteps(start_t: int, ddim_steps: int) -> list[int]:
    """`ddim_steps` timesteps from `start_t` down to 1, evenly spaced and rounded (descending);
    start_t=901 with 10 steps gives ldm's 901, 801, ..., 1. One step: [start_t]."""
    if ddim_steps == 1:
        return [start_t]
    step = (start_t - 1) / (ddim_steps - 1)
    return [start_t - int(round(i * step)) for i in range(ddim_steps)]


@dataclass(frozen=True)
class DiffusionConfig(_Section):
    """ldm DDPM schedule and the DDIM sampler used at inference (spec section 6).

    The DDIM plan (which timesteps the sampler visits, and how noisy its starting latent is):
    - start_t=None (the reference): ldm's uniform spacing 1, 1 + T/S, ..., and the latent noised to
      t=999 ("official", the reference's quirk: the first step treats it as t=901) or to the first
      step's timestep ("consistent"). Only step counts that ldm's spacing honours are valid (10, 20, 25, ...).
    - start_t=t: the latent is noised to t and the S steps go from t down to 1, evenly spaced
      (`spaced_timesteps`); any S in 1..t. This is the consistent schedule started lower.
    - one_step=True (needs ddim_steps=1): the reconstruction is the DDIM pred_x0 of the single eps
      evaluation, (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), instead of ldm's last step to acp[0].
    """

    num_train_timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    ddim_steps: int = 10
    ddim_eta: float = 0.0
    # "official": noise to t=999 then DDIM 901..1 (the reference's behaviour);
    # "consistent": noise to the first DDIM timestep. Only for start_t=None.
    schedule: str = "official"
    guidance_scale: float = 9.0
    start_t: int | None = None          # noise level of the input latent = the first step's timestep
    one_step: bool = False              # reconstruction = pred_x0 of one eps evaluation at the first timestep

    def __post_init__(self):
        if self.schedule not in ("official", "consistent"):
            raise ConfigError(f"DiffusionConfig.schedule must be 'official' or 'consistent', "
                              f"got {self.schedule!r}")
        if not 0.0 < self.linear_start < self.linear_end < 1.0:
            raise ConfigError(f"DiffusionConfig: need 0 < linear_start < linear_end < 1, got "
                              f"{self.linear_start}, {self.linear_end}")
        _check_finite("DiffusionConfig", ddim_eta=self.ddim_eta, guidance_scale=self.guidance_scale)
        if self.ddim_eta < 0:
            raise ConfigError(f"DiffusionConfig.ddim_eta must be >= 0, got {self.ddim_eta}")
        T, S = self.num_train_timesteps, self.ddim_steps
        if not isinstance(S, int) or not 1 <= S <= T:
            raise ConfigError(f"DiffusionConfig.ddim_steps must be in 1..{T}, got {S}")
        if not isinstance(self.one_step, bool):
            raise ConfigError(f"DiffusionConfig.one_step must be True or False, got {self.one_step!r}")
        if self.one_step and S != 1:
            raise ConfigError(f"DiffusionConfig.one_step reconstructs from ONE eps evaluation: ddim_steps must "
                              f"be 1, got {S}")
        if self.start_t is not None:
            if not isinstance(self.start_t, int) or not 1 <= self.start_t < T:
                raise ConfigError(f"DiffusionConfig.start_t must be an integer timestep in 1..{T - 1}, "
                                  f"got {self.start_t!r}")
            if self.schedule != "consistent":
                raise ConfigError(f"DiffusionConfig.start_t={self.start_t} noises the latent to the first step's "
                                  f"timestep, which is the 'consistent' schedule; set schedule='consistent' "
                                  f"('official' noises to {T - 1} and starts at ldm's first timestep, start_t=None)")
            if S > self.start_t:
                raise ConfigError(f"DiffusionConfig.ddim_steps={S} is more than the {self.start_t} timesteps "
                                  f"from start_t={self.start_t} down to 1")
            return
        spaced = uniform_timesteps(T, S)
        if len(spaced) != S or spaced[-1] >= T:  # ldm's spacing honours only some step counts
            good = [d for d in range(max(1, S - 5), S + 6)
                    if len(uniform_timesteps(T, d)) == d and uniform_timesteps(T, d)[-1] < T]
            raise ConfigError(f"DiffusionConfig.ddim_steps={S}: ldm's uniform spacing (every {T // S} of {T} "
                              f"timesteps, from 1) gives {len(spaced)} steps ending at timestep {spaced[-1]} "
                              f"(valid: 0..{T - 1}); nearby valid values: {good}; any step count works with "
                              f"start_t (and schedule='consistent')")

    def timesteps(self) -> list[int]:
        """The timesteps the sampler visits, in order (descending)."""
        if self.start_t is not None:
            return spaced_timesteps(self.start_t, self.ddim_steps)
        return list(uniform_timesteps(self.num_train_timesteps, self.ddim_steps))[::-1]

    @property
    def noise_t(self) -> int:
        """The q_sample level of the starting latent."""
        if self.start_t is None and self.schedule == "official":
            return self.num_train_timesteps - 1
        return self.timesteps()[0]


# The fast preset's sampler (EvalConfig.fast, --preset fast): the reconstruction is the pred_x0 of one
# eps evaluation at t=700, the cheapest setting of the measured grid that was at least as accurate as
# 10 DDIM steps on the demo models (benchmarks/RESULTS.md, "Scoring frontier").
FAST_SAMPLER = dict(schedule="consistent", ddim_steps=1, start_t=700, one_step=True)

# How a detector is scored, for scripts/evaluate.py, scripts/predict.py, the Trainer's evaluations,
# the demo and diad_jax.load; a checkpoint may record one (its "eval_config" metadata).
IMAGE_SCORES = ("pooled", "max")
METRIC_VARIANTS = ("standard", "reference")
RESNET_CHOICES = ("checkpoint", "random")
# What compares an image with its reconstruction (diad_jax.scoring): the reference's ResNet-50
# features, or comparators that need no ImageNet weights (see EvalConfig.comparator).
COMPARATORS = ("resnet", "pixel_l1", "ssim", "vae")
# The comparator without ImageNet weights that scored best on the demo models (benchmarks/RESULTS.md,
# "Comparators"): the demo's, and what a missing ResNet-50 error proposes.
NO_WEIGHTS_COMPARATOR = "pixel_l1"


@dataclass(frozen=True)
class EvalConfig(_Section):
    """Everything that decides an image's anomaly map and score, plus how a split is batched and
    which metric definitions are reported. The defaults are the reference's test path."""

    schedule: str = "official"          # DiffusionConfig.schedule ("official" | "consistent")
    ddim_steps: int = 10
    eta: float = 0.0                    # DDIM eta (the reference: 0)
    guidance_scale: float = 9.0
    start_t: int | None = None          # DiffusionConfig.start_t: noise level = first step (None: the schedule's)
    one_step: bool = False              # DiffusionConfig.one_step: reconstruct from one eps evaluation
    # "resnet": 1 - cos of ResNet-50 layer1-3 features (the reference; needs ImageNet weights);
    # "pixel_l1": |x - x_hat| averaged over channels (normalised space); "ssim": 1 - SSIM (11-tap
    # Gaussian window, sigma 1.5, on [0, 1] images), averaged over channels; "vae": 1 - cos of the
    # model's own VAE-encoder activations at its first three levels. The map is then blurred (sigma).
    comparator: str = "resnet"
    sigma: float = REFERENCE_SIGMA      # anomaly-map Gaussian blur (the reference's 5 is for 256 px maps)
    pool_window: int = REFERENCE_POOL_WINDOW  # image score: eight window x window average pools, then the max
    image_score: str = "pooled"         # "pooled" (the reference) or "max"
    variant: str = "standard"           # metric definitions (diad_jax.metrics): "standard" or "reference"
    batch_size: int = 8                 # global batch (over all devices and processes)
    seed: int = 0                       # image i's noise: fold_in(key(seed), i), the same at any batch size
    dtype: str = "float32"              # compute dtype ("float32" | "bfloat16"); maps are float32
    dedupe_guidance: bool = True        # skip guidance's duplicate half when both contexts are equal (exact)
    # jax.nn.dot_product_attention's implementation: None (XLA's choice, any device), "xla", or "cudnn"
    # (fused attention on NVIDIA GPUs, with dtype "bfloat16")
    attention: str | None = None

    # the fields that leave every image's map and score as they are: how a split is batched (image
    # i's noise is keyed by i), which metric definitions are reported, skipping guidance's identical
    # half (exact) and the attention kernel (the same maths)
    SCORE_NEUTRAL = ("batch_size", "variant", "dedupe_guidance", "attention")

    def scoring_differences(self, other: "EvalConfig") -> dict[str, tuple[Any, Any]]:
        """{field: (this value, the other's)} of the fields that change maps or scores."""
        return {f.name: (getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
                if f.name not in self.SCORE_NEUTRAL and getattr(self, f.name) != getattr(other, f.name)}

    def __post_init__(self):
        self.diffusion()  # validates schedule, ddim_steps, eta, guidance_scale
        _check_finite("EvalConfig", sigma=self.sigma)
        if self.sigma <= 0:
            raise ConfigError(f"EvalConfig.sigma must be > 0, got {self.sigma}")
        for name in ("pool_window", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"EvalConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.seed < 0:
            raise ConfigError(f"EvalConfig.seed must be >= 0, got {self.seed}")
        for name, allowed in (("image_score", IMAGE_SCORES), ("variant", METRIC_VARIANTS),
                              ("dtype", ("float32", "bfloat16")), ("comparator", COMPARATORS),
                              ("attention", (None, "xla", "cudnn"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"EvalConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def fast(self) -> "EvalConfig":
        """This config with the fast sampler (`FAST_SAMPLER`: ONE network pass per image instead of 10;
        measured on the demo models only, benchmarks/RESULTS.md "Scoring frontier": re-check it on
        your data, e.g. `scripts/evaluate.py --preset fast` against the default)."""
        return dataclasses.replace(self, **FAST_SAMPLER)

    def diffusion(self) -> DiffusionConfig:
        return DiffusionConfig(ddim_steps=self.ddim_steps, ddim_eta=self.eta, schedule=self.schedule,
                               guidance_scale=self.guidance_scale, start_t=self.start_t, one_step=self.one_step)

    def scaled_footprint(self, image_size: int) -> "EvalConfig":
        """The blur sigma and pool window scaled from the reference's 256 px to `image_size`, so they
        cover the same fraction of the image (64 px: sigma 1.25, window 2; 256 px: the reference)."""
        scale = image_size / REFERENCE_MAP_SIZE
        return dataclasses.replace(self, sigma=REFERENCE_SIGMA * scale,
                                   pool_window=max(1, round(REFERENCE_POOL_WINDOW * scale)))



@dataclass(frozen=True)
class OptimizerConfig(_Section):
    """AdamW as torch.optim.AdamW (the reference's optimiser, its defaults) with a constant learning
    rate; averaged gradient accumulation over `grad_accum` steps; an optional EMA of the trained params."""

    learning_rate: float = 1e-5
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_accum: int = 4                 # optimizer update every grad_accum steps (optax.MultiSteps)
    ema_decay: float | None = None      # EMA of the trainable params (None: off, as the reference)

    def __post_init__(self):
        _check_finite("OptimizerConfig", learning_rate=self.learning_rate, weight_decay=self.weight_decay,
                      eps=self.eps)
        for name in ("learning_rate", "eps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"OptimizerConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ConfigError(f"OptimizerConfig.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:  # also false for NaN
                raise ConfigError(f"OptimizerConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        _check_ints("OptimizerConfig", self, ("grad_accum",))
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"OptimizerConfig.ema_decay must be in (0, 1) or None, got {self.ema_decay}")


@dataclass(frozen=True)
class DataConfig(_Section):
    """The training data: which dataset (prepared once under data_dir), which classes and split, and
    the global batch."""

    dataset: str = "synthetic"          # one of DATASETS
    data_dir: str | None = None         # prepared datasets; None: $DIAD_DATA_DIR or ~/.cache/diad_jax/data
    manual_dir: str | None = None       # the downloaded dataset's root (not for "synthetic")
    options: dict = field(default_factory=dict)  # data.prepare(**options), e.g. train_per_class
    skip_bad: bool = False              # skip (and list) unreadable files and images without a mask
    classes: tuple[str, ...] | None = None  # None: every class, mixed
    train_split: str = "train"
    batch_size: int = 12                # global batch per step (over all devices and hosts)

    def __post_init__(self):
        if not isinstance(self.options, dict):
            raise ConfigError(f"DataConfig.options must be a mapping, got {self.options!r}")
        object.__setattr__(self, "options", dict(self.options))
        if self.classes is not None:
            object.__setattr__(self, "classes", _tuple(self.classes))
        _check_choice("DataConfig", self, "dataset", DATASETS)
        _check_ints("DataConfig", self, ("batch_size",))


@dataclass(frozen=True)
class ValidationConfig(_Section):
    """When a training run evaluates, on what, and how it picks its best checkpoint (how images are
    scored is TrainConfig.eval)."""

    every: int = 0                      # steps between evaluations (0: only at_end)
    at_end: bool = False
    split: str | None = "test"          # the split that selects the best checkpoint (reference: test); None: no eval
    data_dir: str | None = None         # a separately prepared dataset directory to evaluate on instead
    best_metric: str = "p_auroc+i_auroc"  # sum of mean metrics (reference val_acc = P-AUROC + I-AUROC)
    # "checkpoint": the resnet comparator needs the ResNet-50 of the init checkpoint; "random": a randomly
    # initialised one (maps then compare random features; recorded in every checkpoint so scoring repeats it)
    resnet: str = "checkpoint"

    def __post_init__(self):
        _check_ints("ValidationConfig", self, ("every",), minimum=0)
        _check_choice("ValidationConfig", self, "resnet", RESNET_CHOICES)

    @property
    def active(self) -> bool:
        """Whether the run evaluates at all (a split, and a schedule)."""
        return bool(self.split) and bool(self.every or self.at_end)


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    """Training checkpoints under <workdir>/checkpoints (each step also a model checkpoint)."""

    save_every: int = 1000
    keep: int = 3                       # the most recent checkpoints kept
    async_save: bool = True             # write in the background
    resume: bool = True                 # continue from the latest checkpoint in workdir if there is one

    def __post_init__(self):
        _check_ints("CheckpointConfig", self, ("save_every", "keep"))


@dataclass(frozen=True)
class MeshConfig(_Section):
    """The device mesh (data x fsdp; the batch is split over both) and which params are sharded."""

    data: int = -1                      # data-parallel axis size (-1: all remaining devices)
    fsdp: int = 1                       # fsdp axis size (-1: all remaining devices)
    min_shard_size: int = 2 ** 14       # params with fewer elements are replicated


@dataclass(frozen=True)
class AutoencoderConfig(_Section):
    """The VAE fine-tuning task's loss (diad_jax/autoencoder.py, scripts/finetune_autoencoder.py);
    DiAD training ignores it."""

    kl_weight: float = 1e-6
    perceptual_weight: float = 1.0      # LPIPS weight, when its weights are given
    lpips_vgg16: str | None = None      # torchvision VGG16 state dict (local file)
    lpips_lin: str | None = None        # LPIPS linear layers for VGG (vgg.pth, local file)
    disc_start: int = 50_001            # the reference's discriminator start (not implemented: must exceed steps)

    def __post_init__(self):
        _check_finite("AutoencoderConfig", kl_weight=self.kl_weight, perceptual_weight=self.perceptual_weight)
        for name in ("kl_weight", "perceptual_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"AutoencoderConfig.{name} must be >= 0, got {getattr(self, name)}")


# The flat field names of TrainConfig before it was nested -> where they live now. Flat config files
# and the train_config items of older checkpoints are read through this table.
FLAT_TRAIN_FIELDS = {
    **{k: f"data.{k}" for k in ("dataset", "data_dir", "manual_dir", "skip_bad", "classes", "train_split",
                                "batch_size")},
    "dataset_options": "data.options",
    **{k: f"optimizer.{k}" for k in ("learning_rate", "weight_decay", "b1", "b2", "eps", "grad_accum", "ema_decay")},
    "mesh_data": "mesh.data", "mesh_fsdp": "mesh.fsdp", "min_shard_size": "mesh.min_shard_size",
    "save_every": "checkpoint.save_every", "keep": "checkpoint.keep", "async_checkpoint": "checkpoint.async_save",
    "resume": "checkpoint.resume",
    "eval_every": "validation.every", "eval_at_end": "validation.at_end", "eval_split": "validation.split",
    "eval_data_dir": "validation.data_dir", "best_metric": "validation.best_metric", "eval_resnet": "validation.resnet",
    "eval_batch_size": "eval.batch_size", "eval_seed": "eval.seed", "metrics_variant": "eval.variant",
    "eval_schedule": "eval.schedule", "eval_sigma": "eval.sigma", "eval_pool_window": "eval.pool_window",
    "eval_comparator": "eval.comparator",
    **{k: f"autoencoder.{k}" for k in ("kl_weight", "perceptual_weight", "lpips_vgg16", "lpips_lin", "disc_start")},
}


def set_path(d: dict, path: str, value) -> None:
    """d["a"]["b"] = value for path "a.b" (the sections on the way copied, so `d` may share them)."""
    head, _, rest = path.partition(".")
    if rest:
        d[head] = dict(d.get(head) or {})
        set_path(d[head], rest, value)
    else:
        d[head] = value


def unflatten_train_dict(d: dict) -> tuple[dict, dict[str, str]]:
    """A TrainConfig dict that may use the flat field names of older versions -> (the nested dict,
    {old name: new path} of the names it moved)."""
    out, moved = {}, {}
    for k, v in d.items():
        if k in FLAT_TRAIN_FIELDS:
            moved[k] = FLAT_TRAIN_FIELDS[k]
            set_path(out, FLAT_TRAIN_FIELDS[k], v)
    for k, v in d.items():
        if k not in FLAT_TRAIN_FIELDS:
            if isinstance(v, dict) and isinstance(out.get(k), dict):  # a section given both ways
                out[k] = {**v, **out[k]}
            else:
                out[k] = v
    return out, moved


@dataclass(frozen=True)
class TrainConfig(_Section):
    """A training run (diad_jax/train): the model, then one section per concern. The defaults are the
    reference's (train.py + sgn.py + ldm ddpm.py: AdamW 1e-5, weight decay 0.01, batch 12 x
    accumulation 4, fp32, seed 1); `TrainConfig.tiny()` is the embedded default (tiny model, generated
    data, CPU, a few minutes). Steps count batches (micro-steps); the optimizer updates every
    `optimizer.grad_accum` steps.
    """

    # ---- model -----------------------------------------------------------------------------------
    model: str = "sd15"                 # "sd15", "tiny", "demo" or a ModelConfig JSON file (not with init_checkpoint)
    init_checkpoint: str | None = None  # converted model checkpoint (convert/torch_to_flax.py): params, context, ResNet
    only_mid_control: bool | None = None  # override the model config's (None: keep it; released: True)
    fusion: str | None = None           # override the model config's fusion block, "sff" | "none" (None: keep it)
    compute_dtype: str = "float32"      # "float32" or "bfloat16" (fp32 master weights either way)
    remat: bool = False                 # rematerialise res/transformer blocks in the backward pass
    trainable: str = "reference"        # "reference": SG network + UNet decoder; "sg+unet": also the UNet encoder
    # ---- the DiAD loss ---------------------------------------------------------------------------
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)  # the noise schedule trained on
    train_t_max: int = 1000             # noise levels trained on: t ~ U{0..train_t_max-1} (the reference: all)
    # ---- the run ---------------------------------------------------------------------------------
    steps: int = 100_000                # total steps (batches) of the run, resumed runs included
    seed: int = 1
    workdir: str = "runs/diad"          # checkpoints/, best/, metrics.jsonl, tensorboard/
    log_every: int = 10
    profile_steps: tuple[int, int] | None = None  # [first, last): a jax.profiler trace in <workdir>/profile
    # ---- sections --------------------------------------------------------------------------------
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # how validation scores images
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)

    SECTIONS = {"data": DataConfig, "optimizer": OptimizerConfig, "mesh": MeshConfig, "checkpoint": CheckpointConfig,
                "validation": ValidationConfig, "eval": EvalConfig, "diffusion": DiffusionConfig,
                "autoencoder": AutoencoderConfig}

    def __post_init__(self):
        for name, section in self.SECTIONS.items():
            if not isinstance(getattr(self, name), section):
                raise ConfigError(f"TrainConfig.{name} must be a {section.__name__}, got {getattr(self, name)!r}")
        _check_choice("TrainConfig", self, "compute_dtype", ("float32", "bfloat16"))
        _check_choice("TrainConfig", self, "fusion", (None, *FUSIONS))
        _check_choice("TrainConfig", self, "trainable", ("reference", "sg+unet"))
        _check_ints("TrainConfig", self, ("steps", "log_every"))
        _check_ints("TrainConfig", self, ("seed",), minimum=0)
        T = self.diffusion.num_train_timesteps
        if not isinstance(self.train_t_max, int) or not 1 <= self.train_t_max <= T:
            raise ConfigError(f"TrainConfig.train_t_max must be an integer in 1..{T}, got {self.train_t_max!r}")
        if self.profile_steps is not None:
            steps = _tuple(self.profile_steps)
            if not (isinstance(steps, tuple) and len(steps) == 2 and all(type(x) is int for x in steps)
                    and 0 <= steps[0] < steps[1]):
                raise ConfigError(f"TrainConfig.profile_steps must be (first, last) with 0 <= first < last, "
                                  f"got {self.profile_steps!r}")
            object.__setattr__(self, "profile_steps", steps)

    @classmethod
    def tiny(cls, **changes) -> "TrainConfig":
        """The embedded default: tiny model, generated 64x64 dataset, plain data parallelism on
        whatever devices there are, a higher learning rate so the loss visibly drops in minutes.
        `changes` by dotted path, as `replace` takes them."""
        base = cls(model="tiny", steps=200, workdir="runs/tiny", log_every=10,
                   data=DataConfig(batch_size=8, options=dict(train_per_class=24, test_per_class=8)),
                   optimizer=OptimizerConfig(learning_rate=1e-4, grad_accum=1),
                   checkpoint=CheckpointConfig(save_every=100),
                   validation=ValidationConfig(at_end=True, resnet="random"))
        return base.replace(**changes)

    @classmethod
    def reference(cls, **changes) -> "TrainConfig":
        """The released train.py's hyperparameters (batch 12 x 4, AdamW 1e-5, fp32, seed 1)."""
        return cls().replace(**changes)

    def replace(self, **changes) -> "TrainConfig":
        """This config with fields changed by dotted path, e.g. cfg.replace(steps=50,
        **{"optimizer.learning_rate": 1e-4}); a whole section may be given too (data=DataConfig(...))."""
        d = self.to_dict()
        for path, value in changes.items():
            set_path(d, path, value)
        return TrainConfig.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict, where: str | None = None) -> "TrainConfig":
        """From the nested dict `to_dict` gives; the flat names of older versions are read too
        (FLAT_TRAIN_FIELDS), with a warning naming where each one lives now."""
        d, moved = unflatten_train_dict(d)
        if moved:
            log.warning("%s uses the flat TrainConfig names of older versions: %s", where or "a TrainConfig",
                        ", ".join(f"{k} -> {v}" for k, v in moved.items()))
        return super().from_dict(d, where or "TrainConfig")
