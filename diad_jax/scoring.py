"""Anomaly maps and scores (spec sections 6.5-6.7), and the one jitted denoise-and-score program.

    x --VAE--> z0 (posterior sample) --q_sample--> x_T --DDIM (SG-guided UNet)--> z --VAE--> x_hat
    ResNet-50 layer1..3 of x and x_hat -> 1 - cos per scale -> bilinear (align_corners) upsampling
    -> sum -> Gaussian blur (sigma 5, truncate 4, reflect) = pixel map
    image score = max of the map after eight 8x8 stride-1 average pools (the reference), or max.

The comparator (x vs x_hat) is the reference's ResNet-50 by default; "pixel_l1", "ssim" and "vae"
(the model's own VAE-encoder features, compared like the ResNet's) need no ImageNet weights.

The "inversion" method (InvAD, Sakai et al., arXiv 2504.05662) reconstructs nothing:

    x --VAE--> z0 (posterior mean, or a sample) --DDIM inversion (SG-guided UNet, eta 0)--> x_T
    |x_T| over channels -> bilinear (align_corners) upsampling -> Gaussian blur = pixel map
    image score = the map's pooled max or max (as above), or "nll": -log N(x_T; 0, I)

`Scorer` compiles all of it into a single XLA program (no host round-trips), batched, sharded
over the `data` axis of a mesh when one is given.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from diad_jax import sharding as shd
from diad_jax.configs import (COMPARATORS, IMAGE_SCORES, IMAGENET_MEAN, IMAGENET_STD, INVERSION_LATENTS, METHODS,
                              REFERENCE_POOL_WINDOW, REFERENCE_SIGMA, DiffusionConfig, EvalConfig, ModelConfig)
from diad_jax.diffusion import ddim_invert, ddim_sample, example_keys, guided_eps, inversion_timesteps, q_sample
from diad_jax.errors import ConfigError, NonFiniteError
from diad_jax.models.diad import DTYPES, DiAD, to_nhwc
from diad_jax.models.init import init_params
from diad_jax.models.resnet import ResNet50Features, resnet_abstract_params


# ---- map operations -------------------------------------------------------------------------------
def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage's kernel: radius int(truncate * sigma + 0.5), normalised exp(-x^2 / 2 sigma^2)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (sigma * sigma) * x ** 2)
    return phi / phi.sum()


def _reflect_index(n: int, radius: int) -> np.ndarray:
    """Indices of scipy's 'reflect' (half-sample symmetric, d c b a | a b c d) padding,
    repeated for radii larger than the signal."""
    idx = np.arange(-radius, n + radius)
    period = 2 * n
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - 1 - idx, idx)


def gaussian_blur(maps, sigma: float = REFERENCE_SIGMA, truncate: float = 4.0):
    """scipy.ndimage.gaussian_filter(map, sigma, truncate=truncate, mode='reflect') on each map of
    a (B, H, W) batch (separable, float32)."""
    k = jnp.asarray(gaussian_kernel1d(sigma, truncate), jnp.float32)
    r = (k.shape[0] - 1) // 2
    b, h, w = maps.shape
    x = maps.astype(jnp.float32)
    x = x[:, _reflect_index(h, r), :][:, :, _reflect_index(w, r)]
    x = x[:, None, :, :]  # NCHW, C=1
    x = jax.lax.conv_general_dilated(x, k.reshape(1, 1, -1, 1), (1, 1), "VALID",
                                     precision=jax.lax.Precision.HIGHEST)
    x = jax.lax.conv_general_dilated(x, k.reshape(1, 1, 1, -1), (1, 1), "VALID",
                                     precision=jax.lax.Precision.HIGHEST)
    return x[:, 0]


def _align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights with align_corners=True, computed the way
    torch's CPU kernel does (scale, source index and lambda in float32), so the rounding of the
    reference's weights is reproduced too (exact float64 weights differ from torch by ~1e-5)."""
    m = np.zeros((n_out, n_in), np.float32)
    if n_in == 1 or n_out == 1:
        m[:, 0] = 1.0
        return m
    scale = np.float32(n_in - 1) / np.float32(n_out - 1)
    src = (scale * np.arange(n_out, dtype=np.float32)).astype(np.float32)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    rows = np.arange(n_out)
    m[rows, i0] += np.float32(1) - lam
    m[rows, i1] += lam
    return m


def resize_bilinear_align_corners(x, size: tuple[int, int]):
    """torch `F.interpolate(x, size, mode='bilinear', align_corners=True)` for (B, h, w) maps.
    (`jax.image.resize` uses half-pixel centres, i.e. align_corners=False.)"""
    _, h, w = x.shape
    my = jnp.asarray(_align_corners_matrix(h, size[0]))
    mx = jnp.asarray(_align_corners_matrix(w, size[1]))
    return jnp.einsum("oh,bhw,pw->bop", my, x.astype(jnp.float32), mx, precision=jax.lax.Precision.HIGHEST)


def cosine_distance_map(a, b, eps: float = 1e-8):
    """1 - cosine similarity over channels (NHWC -> (B, H, W)), as torch F.cosine_similarity."""
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    dot = jnp.sum(a * b, axis=-1)
    norm = jnp.sqrt(jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1))
    return 1.0 - dot / jnp.maximum(norm, eps)


def feature_distance(feats_in, feats_out, size: tuple[int, int]):
    """Sum over scales of (1 - cos) maps upsampled to `size` (the reference's amap_mode 'a')."""
    total = 0.0
    for fi, fo in zip(feats_in, feats_out):
        total = total + resize_bilinear_align_corners(cosine_distance_map(fi, fo), size)
    return total


def pixel_l1_distance(images, recon):
    """|x - x_hat| averaged over channels, in the normalised input space: (B, 3, H, W) -> (B, H, W)."""
    return jnp.mean(jnp.abs(images.astype(jnp.float32) - recon.astype(jnp.float32)), axis=1)


SSIM_SIGMA, SSIM_TRUNCATE = 1.5, 3.5  # the usual 11-tap Gaussian window (radius 5)
SSIM_C1, SSIM_C2 = 0.01 ** 2, 0.03 ** 2  # (k * data range)^2 for images in [0, 1]


def ssim_distance(images, recon):
    """1 - SSIM (Wang et al. 2004; Gaussian window, sigma 1.5) per pixel, averaged over channels, on
    the images mapped back to [0, 1]: (B, 3, H, W) normalised -> (B, H, W)."""
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)[:, None, None]
    std = jnp.asarray(IMAGENET_STD, jnp.float32)[:, None, None]
    b, c, h, w = images.shape
    x = (images.astype(jnp.float32) * std + mean).reshape(b * c, h, w)
    y = (recon.astype(jnp.float32) * std + mean).reshape(b * c, h, w)
    blur = partial(gaussian_blur, sigma=SSIM_SIGMA, truncate=SSIM_TRUNCATE)
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_x ** 2 + mu_y ** 2 + SSIM_C1) * (var_x + var_y + SSIM_C2))
    return 1.0 - jnp.mean(ssim.reshape(b, c, h, w), axis=1)


# the "vae" comparator's features: the outputs of the VAE encoder's first three down levels (after
# their downsampling: 1/2, 1/4 and 1/8 of the image size in SD's VAE)
VAE_FEATURE_LEVELS = 3


IMAGE_SCORE_POOLS = 8  # the reference's EvalImageMax: eight successive average pools


def pooled_max(maps, pools: int = IMAGE_SCORE_POOLS, window: int = REFERENCE_POOL_WINDOW):
    """The reference's image score (EvalImageMax): `pools` successive window x window, stride 1,
    unpadded average pools (256 -> 200 px per side for 8 x 8), then the max."""
    x = maps.astype(jnp.float32)
    for _ in range(pools):
        x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, window, window), (1, 1, 1), "VALID") / (window * window)
    return jnp.max(x, axis=(1, 2))


def image_scores(maps, mode: str = "pooled", window: int = REFERENCE_POOL_WINDOW):
    """A map's image score: "pooled" (the reference) or "max" ("nll" is the inversion's own, `latent_nll`)."""
    if mode == "pooled":
        return pooled_max(maps, window=window)
    if mode == "max":
        return jnp.max(maps, axis=(1, 2))
    raise ValueError(f"image score mode must be 'pooled' (the reference) or 'max', got {mode!r}")


def latent_nll(x):
    """-log N(x; 0, I) of each (B, ...) latent: 0.5 * sum(x^2 + log 2 pi) over all but the batch axis."""
    x = x.astype(jnp.float32)
    return 0.5 * jnp.sum(jnp.square(x) + np.log(2 * np.pi), axis=tuple(range(1, x.ndim)))


# ---- the scorer -------------------------------------------------------------------------------------
class ScoreOutput(NamedTuple):
    maps: jax.Array         # (B, H, W) pixel anomaly maps
    scores: jax.Array       # (B,) image scores
    reconstructions: jax.Array | None  # (B, 3, H, W) the denoised reconstruction, normalised image space
                                       # (None under the inversion method, which reconstructs nothing)


@dataclass
class _Programs:
    """A Scorer's two jitted programs (without and with an unconditional context) and how many
    times jax traced them, shared by the Scorers of equal settings (see `_shared_programs`)."""
    plain: Callable
    guided: Callable
    traces: int = 0


# The programs of the last _SHARED_SETTINGS Scorer settings built in this process. A Scorer whose
# settings (every field) equal an earlier one's reuses its programs: a second Scorer for the same
# model (a re-built Detector, the same checkpoint loaded again) traces and compiles nothing that
# its twin already has.
_SHARED_SETTINGS = 8
_shared_programs: OrderedDict[tuple, _Programs] = OrderedDict()


def clear_shared_programs() -> None:
    """Forget the shared programs (Scorers built before keep theirs; the next ones build anew)."""
    _shared_programs.clear()


@dataclass
class Scorer:
    """Denoise-and-score (or, with method="inversion", invert-and-score) as one compiled program.

        scorer = Scorer(ModelConfig.sd15())      # or Scorer.from_eval_config(config, EvalConfig(...))
        out = scorer(bundle, images, jax.random.key(0), index)   # images: (B, 3, H, W) normalised

    `bundle` = {"unet", "sg", "vae": model params, "resnet": ResNet params, "context": (1, L, D)}
    (see `make_bundle`), best placed on the devices once (`diad_jax.load` does). Image i's noise
    (VAE posterior sample, q_sample, DDIM eta noise) comes from fold_in(rng, index[i]), so its map
    and score do not depend on the batch it is in (`index` defaults to 0..B-1).
    `uncond_context=None` means the unconditional context equals the conditional one (the
    reference: both CLIP("")), so guidance is skipped exactly; an array runs the reference's
    batched two-half guidance with it (`distinct_uncond_context` tells, once, whether one is
    needed; the Detector asks it when built). With a mesh, the batch is split over `data_axis`."""

    config: ModelConfig
    diffusion: DiffusionConfig = DiffusionConfig()
    image_score: str = "pooled"
    dtype: Any = jnp.float32
    mesh: jax.sharding.Mesh | None = None
    data_axis: str | tuple[str, ...] = "data"
    sigma: float = REFERENCE_SIGMA
    dedupe_guidance: bool = True
    pool_window: int = REFERENCE_POOL_WINDOW
    comparator: str = "resnet"
    attention: str | None = None  # jax.nn.dot_product_attention's implementation (None: XLA's choice)
    method: str = "reconstruction"  # or "inversion" (see the module docstring)
    # ascending, one network pass each (default: EvalConfig's plan); what is inverted: the VAE
    # posterior's mean or a sample
    inversion_timesteps: tuple[int, ...] = tuple(inversion_timesteps(EvalConfig.inversion_end_t,
                                                                     EvalConfig.inversion_steps))
    inversion_latent: str = EvalConfig.inversion_latent

    @classmethod
    def from_eval_config(cls, config: ModelConfig, ec: EvalConfig, mesh=None, data_axis="data") -> "Scorer":
        return cls(config, ec.diffusion(), image_score=ec.image_score, dtype=DTYPES[ec.dtype], mesh=mesh,
                   data_axis=data_axis, sigma=ec.sigma, dedupe_guidance=ec.dedupe_guidance, pool_window=ec.pool_window,
                   comparator=ec.comparator, attention=ec.attention, method=ec.method,
                   inversion_timesteps=tuple(inversion_timesteps(ec.inversion_end_t, ec.inversion_steps)),
                   inversion_latent=ec.inversion_latent)

    def __post_init__(self):
        for name, allowed in (("comparator", COMPARATORS), ("method", METHODS), ("image_score", IMAGE_SCORES),
                              ("inversion_latent", INVERSION_LATENTS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"Scorer: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.image_score == "nll" and self.method != "inversion":
            raise ConfigError("Scorer: image_score 'nll' is the likelihood of the inverted latent; it needs the "
                              "inversion method")
        self.model = DiAD(self.config, dtype=self.dtype, attention=self.attention)
        self.resnet = ResNet50Features(dtype=self.dtype)
        if self.image_score == "pooled" and self.config.image_size <= IMAGE_SCORE_POOLS * (self.pool_window - 1):
            raise ConfigError(f"Scorer: {IMAGE_SCORE_POOLS} average pools of window {self.pool_window} need maps "
                              f"larger than {IMAGE_SCORE_POOLS * (self.pool_window - 1)} px, the model's are "
                              f"{self.config.image_size}; scale the footprint to the image size ({{1}}) or use a "
                              f"smaller {{0}}", fields=["pool_window", "scaled_footprint"])
        if self.pool_window < 1 or not 0 < self.sigma < float("inf"):
            raise ValueError(f"Scorer: pool_window must be >= 1 and sigma > 0, got {self.pool_window}, {self.sigma}")
        self.inversion_timesteps = tuple(self.inversion_timesteps)
        if isinstance(self.data_axis, list):
            self.data_axis = tuple(self.data_axis)
        settings = (type(self), *(getattr(self, f.name) for f in fields(self)))
        self._programs = _shared_programs.pop(settings, None) or self._build_programs()
        _shared_programs[settings] = self._programs  # the newest last
        while len(_shared_programs) > _SHARED_SETTINGS:
            _shared_programs.popitem(last=False)

    def _build_programs(self) -> _Programs:
        out = None
        if self.mesh is not None:
            data = NamedSharding(self.mesh, P(self.data_axis))
            out = ScoreOutput(data, data, data if self.method == "reconstruction" else None)
        # the weights keep the shardings they were placed with (replicated, or fsdp-sharded)
        return _Programs(jax.jit(partial(self._score, uncond=None), out_shardings=out),
                         jax.jit(self._score, out_shardings=out))

    def _score(self, bundle, images, rng, index, uncond):
        self._programs.traces += 1  # Python runs this only while jax traces a program: once per new input shape
        keys = jax.vmap(lambda k: jax.random.split(k, 3))(example_keys(rng, index))
        c = self.config
        shape = (c.latent_channels, c.latent_size, c.latent_size)
        draw = jax.vmap(lambda k: jax.random.normal(k, shape))
        if self.method == "inversion":  # the same posterior draw as the reconstruction's
            return self.invert(bundle, images, draw(keys[:, 0]), uncond)
        return self.score_with_noise(bundle, images, draw(keys[:, 0]), draw(keys[:, 1]), uncond, keys[:, 2])

    def eps_fn(self, bundle, images, uncond=None):
        """The sampler's (and the inversion's) noise prediction eps(x, t): the SG network conditioned on
        `images`, guidance as configured. Traceable."""
        def eps_ctx(x, t, ctx):
            hint = images if x.shape[0] == images.shape[0] else jnp.concatenate([images, images])
            return self.model.eps(bundle, x, t, ctx, hint)

        return lambda x, t: guided_eps(eps_ctx, x, t, bundle["context"], uncond, self.diffusion.guidance_scale)

    def score_with_noise(self, bundle, images, posterior_noise, noise, uncond=None, ddim_keys=None):
        """The whole pipeline with the two Gaussian draws given explicitly (the VAE posterior
        sample's and q_sample's), e.g. to compare with another implementation; `ddim_keys` (B,)
        per-image keys for the DDIM eta noise. Traceable."""
        model = self.model
        mean, logvar = model.encode_moments(bundle, images)
        z0 = self.config.scale_factor * (mean + jnp.exp(0.5 * logvar) * posterior_noise)
        x_T = q_sample(self.diffusion, z0, self.diffusion.noise_t, noise)
        z = ddim_sample(self.diffusion, self.eps_fn(bundle, images, uncond), x_T,
                        ddim_keys if self.diffusion.ddim_eta > 0 else None)
        recon = model.decode(bundle, z)
        maps = gaussian_blur(self.distance(bundle, images, recon), self.sigma)
        return ScoreOutput(maps, image_scores(maps, self.image_score, self.pool_window), recon)

    def inverted_latent(self, bundle, images, posterior_noise, uncond=None):
        """The inversion method's x_T: the (scaled) latent of `images` -- the posterior mean, or its
        sample with `posterior_noise` -- DDIM-inverted through `inversion_timesteps`. Traceable."""
        mean, logvar = self.model.encode_moments(bundle, images)
        latent = mean if self.inversion_latent == "mean" else mean + jnp.exp(0.5 * logvar) * posterior_noise
        return ddim_invert(self.diffusion, self.eps_fn(bundle, images, uncond), self.config.scale_factor * latent,
                           self.inversion_timesteps)

    def invert(self, bundle, images, posterior_noise, uncond=None) -> ScoreOutput:
        """The inversion method's maps and scores (no reconstruction). Traceable."""
        x_T = self.inverted_latent(bundle, images, posterior_noise, uncond).astype(jnp.float32)
        norms = jnp.sqrt(jnp.sum(jnp.square(x_T), axis=1))  # (B, h, w): NCHW latents
        maps = gaussian_blur(resize_bilinear_align_corners(norms, images.shape[2:]), self.sigma)
        scores = latent_nll(x_T) if self.image_score == "nll" else image_scores(maps, self.image_score,
                                                                                self.pool_window)
        return ScoreOutput(maps, scores, None)

    def distance(self, bundle, images, recon):
        """The comparator's unblurred (B, H, W) map of how `recon` differs from `images` (NCHW)."""
        size = (images.shape[2], images.shape[3])
        b = images.shape[0]
        if self.comparator == "pixel_l1":
            return pixel_l1_distance(images, recon)
        if self.comparator == "ssim":
            return ssim_distance(images, recon)
        if self.comparator == "vae":
            feats = self.model.encoder_features(bundle, jnp.concatenate([images, recon]))[:VAE_FEATURE_LEVELS]
        else:
            feats = self.resnet.apply({"params": bundle["resnet"]}, to_nhwc(jnp.concatenate([images, recon])))
        return feature_distance([f[:b] for f in feats], [f[b:] for f in feats], size)

    def _args(self, bundle, images, rng, index, uncond_context):
        cfg = self.config
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (cfg.image_size, cfg.image_size):
            raise ValueError(f"Scorer: `images` has shape {tuple(images.shape)}, expected "
                             f"(B, 3, {cfg.image_size}, {cfg.image_size}) (NCHW, ImageNet-normalised)")
        if index is None:
            index = np.arange(images.shape[0], dtype=np.int32)
        if self.mesh is not None and jax.process_count() == 1:  # explicit transfers onto the batch sharding
            data = NamedSharding(self.mesh, P(self.data_axis))
            images = jax.device_put(images, NamedSharding(self.mesh, P(self.data_axis, None, None, None)))
            index = jax.device_put(np.asarray(index, np.int32) if not isinstance(index, jax.Array) else index, data)
        if uncond_context is None and not self.dedupe_guidance:
            uncond_context = bundle["context"]
        return (bundle, images, rng, index) + (() if uncond_context is None else (jnp.asarray(uncond_context),))

    def _program(self, args: tuple) -> Callable:
        return self._programs.plain if len(args) == 4 else self._programs.guided

    def __call__(self, bundle, images, rng, index=None, uncond_context=None) -> ScoreOutput:
        args = self._args(bundle, images, rng, index, uncond_context)
        return self._program(args)(*args)

    def lower(self, bundle, images, rng, index=None, uncond_context=None):
        args = self._args(bundle, images, rng, index, uncond_context)
        return self._program(args).lower(*args)

    def export(self, bundle, images, rng, index, platforms=None) -> jax.export.Exported:
        """The program `__call__` runs on arguments like these (shapes, dtypes, placement), exported
        for `platforms` (default: the devices') with the weights as arguments: it takes
        (bundle, images, rng, index) and returns {"maps", "scores"[, "reconstructions"]} (a dict, which
        serialises without this module's ScoreOutput; the inversion method has no reconstructions).
        Without guidance deduplication the bundle's context is the unconditional one, as in `__call__`."""
        fn = self._programs.plain if self.dedupe_guidance else self._programs.guided

        def program(bundle, images, rng, index):
            out = fn(bundle, images, rng, index, *(() if self.dedupe_guidance else (bundle["context"],)))
            return {k: v for k, v in out._asdict().items() if v is not None}

        args = self._args(bundle, images, rng, index, None)[:4]
        return jax.export.export(jax.jit(program), platforms=platforms)(*args)

    def compiled_programs(self) -> int:
        """How many scoring programs have been built for this scorer's settings in this process
        (Scorers of equal settings share them): jax traces the program once per new input shape
        (batch size, guidance on or off) and compiles each trace a call runs once; a call with
        shapes seen before reuses its program. (`lower` and `export` of new shapes trace too, and
        count.)"""
        return self._programs.traces


def check_finite_maps(maps: np.ndarray, scores: np.ndarray, name_of: Callable[[int], str]) -> None:
    """Raises NonFiniteError naming the images (`name_of(i)`, the first ten) whose anomaly map or
    score holds NaN or inf -- usually weights that are not finite, or a diverged model."""
    bad = np.flatnonzero(~(np.isfinite(scores) & np.isfinite(maps.reshape(len(maps), -1)).all(axis=1)))
    if len(bad):
        raise NonFiniteError(f"{len(bad)} of {len(scores)} images have non-finite anomaly maps or scores "
                             f"(the model's weights or its reconstructions are not finite): "
                             f"{', '.join(name_of(int(i)) for i in bad[:10])}{' ...' if len(bad) > 10 else ''}")


def distinct_uncond_context(context, uncond_context):
    """The unconditional context guidance must run with: None when there is none or it equals
    `context` (the reference: both are CLIP(""), so guidance is the identity and one UNet pass per
    step is exact), else `uncond_context`. Decided once, from the host values (gathered from every
    process when the arrays span several: call it on all processes together), not per call."""
    if uncond_context is None:
        return None

    def host(x):
        return np.asarray(shd.gather_to_host(x) if isinstance(x, jax.Array) and not x.is_fully_addressable else x)

    return None if np.array_equal(host(context), host(uncond_context)) else uncond_context


def random_resnet(seed: int = 0) -> dict:
    """A randomly initialised ResNet-50 (host numpy): only where a caller opted in to one
    (`diad_jax.load(..., resnet="random")`, `ValidationConfig.resnet="random"`)."""
    return init_params({"resnet": resnet_abstract_params()}, seed)["resnet"]


def make_bundle(params: dict, resnet: dict | None, context) -> dict:
    """Everything the scorer needs in one pytree (`resnet` only for the "resnet" comparator)."""
    if not isinstance(context, jax.Array):  # placed arrays (possibly spanning processes) are kept as they are
        context = jnp.asarray(context, jnp.float32)
    return {**params, "context": context} | ({} if resnet is None else {"resnet": resnet})
