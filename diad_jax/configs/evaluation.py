"""How a detector is scored (EvalConfig) and the choices of its fields; for `diad-jax evaluate`,
`predict`, the Trainer's evaluations, the demo and diad_jax.load. A checkpoint may record one
(its "eval_config" metadata)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from diad_jax.configs.checks import require_choice, require_finite, require_ints
from diad_jax.configs.constants import (COMPARATORS, COMPUTE_DTYPES, REFERENCE_MAP_SIZE, REFERENCE_POOL_WINDOW,
                                        REFERENCE_SIGMA)
from diad_jax.configs.sampler import FAST_SAMPLER, SCHEDULES, DiffusionConfig
from diad_jax.configs.serialization import Section
from diad_jax.errors import ConfigError

# how an image is scored: "reconstruction" (the reference: denoise a noised latent, compare the
# reconstruction with the input) or "inversion" (InvAD, arXiv 2504.05662: DDIM-invert the clean
# latent to noise, score how unlikely that noise is under N(0, I); no reconstruction, no comparator)
METHODS = ("reconstruction", "inversion")
IMAGE_SCORES = ("pooled", "max", "nll")
INVERSION_LATENTS = ("mean", "sample")  # the VAE posterior's mean, or a sample of it (the reconstruction's)
METRIC_VARIANTS = ("standard", "reference")
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")  # jax.nn.dot_product_attention's (None: XLA's choice)

# EvalConfig's names of the DiffusionConfig fields it sets (the others have the same names)
_SAMPLER_FIELDS = {"ddim_eta": "eta"}

# The inversion preset (EvalConfig.inversion, --preset inversion): 5 steps to t=999 from the posterior mean,
# the most accurate image scores of the grid measured on the demo models and on photographs with painted
# defects (benchmarks/RESULTS.md, "Inversion"): 5 steps beat InvAD's 3, the mean beat a posterior sample,
# and the map's pooled max beat the latent's NLL on both.
INVERSION_PRESET = dict(method="inversion", inversion_steps=5, inversion_end_t=999, inversion_latent="mean")


@dataclass(frozen=True)
class EvalConfig(Section):
    """Everything that decides an image's anomaly map and score, plus how a split is batched and
    which metric definitions are reported. The defaults are the reference's test path."""

    method: str = "reconstruction"      # one of METHODS; the sampler and comparator fields are the reconstruction's
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
    image_score: str = "pooled"         # "pooled" (the reference), "max", or "nll" (inversion: the latent's NLL)
    # the inversion's plan: `inversion_steps` DDIM steps (network passes) up to `inversion_end_t`, visiting
    # round(k * end_t / steps), k = 1..steps (InvAD's 3 to 999: 333, 666, 999), from the posterior's mean or a
    # sample; the defaults are the inversion preset's (measured, see INVERSION_PRESET)
    inversion_steps: int = 5
    inversion_end_t: int = 999
    inversion_latent: str = "mean"
    variant: str = "standard"           # metric definitions (diad_jax.metrics): "standard" or "reference"
    batch_size: int = 8                 # global batch (over all devices and processes)
    seed: int = 0                       # image i's noise: fold_in(key(seed), i), the same at any batch size
    dtype: str = "float32"              # compute dtype (one of COMPUTE_DTYPES); maps are float32
    dedupe_guidance: bool = True        # skip guidance's duplicate half when both contexts are equal (exact)
    # jax.nn.dot_product_attention's implementation: None (XLA's choice, any device), "xla", or "cudnn"
    # (fused attention on NVIDIA GPUs, with dtype "bfloat16")
    attention: str | None = None

    # the fields that leave every image's map and score as they are: how a split is batched (image
    # i's noise is keyed by i), which metric definitions are reported, skipping guidance's identical
    # half (exact) and the attention kernel (the same maths)
    SCORE_NEUTRAL = ("batch_size", "variant", "dedupe_guidance", "attention")
    # the allowed values of the fields that take one of a few (the commands' flags offer them as choices)
    CHOICES = {"method": METHODS, "schedule": SCHEDULES, "comparator": COMPARATORS, "image_score": IMAGE_SCORES,
               "variant": METRIC_VARIANTS, "dtype": COMPUTE_DTYPES, "attention": ATTENTION_IMPLEMENTATIONS,
               "inversion_latent": INVERSION_LATENTS}

    def scoring_differences(self, other: "EvalConfig") -> dict[str, tuple[Any, Any]]:
        """{field: (this value, the other's)} of the fields that change maps or scores."""
        return {f.name: (getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
                if f.name not in self.SCORE_NEUTRAL and getattr(self, f.name) != getattr(other, f.name)}

    def __post_init__(self):
        try:
            self.diffusion()  # validates schedule, ddim_steps, eta, guidance_scale, start_t, one_step
        except ConfigError as e:  # named by this config's fields
            raise e.renamed(lambda field: _SAMPLER_FIELDS.get(field, field)) from e.__cause__
        require_finite(self, "sigma")
        if self.sigma <= 0:
            raise ConfigError(f"{{0}} must be > 0, got {self.sigma}", fields=["sigma"])
        require_ints(self, "pool_window", "batch_size")
        require_ints(self, "seed", minimum=0)
        for name, allowed in self.CHOICES.items():
            require_choice(self, name, allowed)
        require_ints(self, "inversion_steps", "inversion_end_t")
        last = self.diffusion().num_train_timesteps - 1
        if self.inversion_end_t > last:
            raise ConfigError(f"{{0}} must be a timestep in 1..{last}, got {self.inversion_end_t}",
                              fields=["inversion_end_t"])
        if self.inversion_steps > self.inversion_end_t:
            raise ConfigError(f"{{0}}={self.inversion_steps} is more than the {self.inversion_end_t} timesteps up to "
                              f"{{1}}={self.inversion_end_t}", fields=["inversion_steps", "inversion_end_t"])
        if self.image_score == "nll" and self.method != "inversion":
            raise ConfigError("{0}=nll is the likelihood of the inverted latent: it needs {1}",
                              fields=["image_score", "method=inversion"])

    @property
    def needs_resnet(self) -> bool:
        """Whether scoring runs the ResNet-50 (the reconstruction method with the resnet comparator)."""
        return self.method == "reconstruction" and self.comparator == "resnet"

    def fast(self) -> "EvalConfig":
        """This config with the fast sampler (`FAST_SAMPLER`: ONE network pass per image instead of 10;
        measured on the demo models only, benchmarks/RESULTS.md "Scoring frontier": re-check it on
        your data, e.g. `scripts/evaluate.py --preset fast` against the default)."""
        return dataclasses.replace(self, **FAST_SAMPLER)

    def inversion(self) -> "EvalConfig":
        """This config with the inversion preset (`INVERSION_PRESET`: InvAD's reconstruction-free
        scoring with the settings measured best on the demo models, benchmarks/RESULTS.md
        "Inversion"; re-check it on your data)."""
        return dataclasses.replace(self, **INVERSION_PRESET)

    def diffusion(self) -> DiffusionConfig:
        return DiffusionConfig(ddim_steps=self.ddim_steps, ddim_eta=self.eta, schedule=self.schedule,
                               guidance_scale=self.guidance_scale, start_t=self.start_t, one_step=self.one_step)

    def scaled_footprint(self, image_size: int) -> "EvalConfig":
        """The blur sigma and pool window scaled from the reference's 256 px to `image_size`, so they
        cover the same fraction of the image (64 px: sigma 1.25, window 2; 256 px: the reference)."""
        scale = image_size / REFERENCE_MAP_SIZE
        return dataclasses.replace(self, sigma=REFERENCE_SIGMA * scale,
                                   pool_window=max(1, round(REFERENCE_POOL_WINDOW * scale)))
