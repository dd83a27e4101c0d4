"""DiAD: the VAE, the controlled SD UNet and the SG network wired together.

`DiAD` is a plain Python object holding three Flax modules; its methods are pure functions of a
params dict `{"unet": ..., "sg": ..., "vae": ...}` and take/return NCHW arrays (the reference's
and diffusers' layout), so they compose with `jax.jit`, `jax.grad` and sharding directly:

    model = DiAD(ModelConfig.tiny())
    params = model.init(seed=0)
    z = model.encode(params, images, rng)               # (B, 4, h, w), scaled by 0.18215
    eps = model.eps(params, z_t, t, context, images)    # predicted noise
    recon = model.decode(params, z)                      # (B, 3, H, W)
"""
from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import traverse_util
from flax.core import meta

from diad_jax.configs import ModelConfig
from diad_jax.errors import ConfigError
from diad_jax.models.init import init_params, traced_once
from diad_jax.models.sd import AutoencoderKL, UNet
from diad_jax.models.sg_network import SemanticGuidedNetwork

Params = dict[str, Any]

# The compute dtypes by their config names (TrainConfig.compute_dtype, EvalConfig.dtype): the
# `dtype` a DiAD computes in (its params stay float32).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def to_nhwc(x):
    return jnp.transpose(x, (0, 2, 3, 1))


def to_nchw(x):
    return jnp.transpose(x, (0, 3, 1, 2))


def _check(name: str, x, expected: tuple, what: str = "") -> None:
    """Raise a ValueError naming the argument when `x.shape` does not match `expected`
    (None entries match anything)."""
    shape = tuple(getattr(x, "shape", ()))
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape))
    if not ok:
        exp = "(" + ", ".join("B" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"DiAD: argument `{name}` has shape {shape}, expected {exp}{what}")


class DiAD:
    """The DiAD model as pure functions of its params. NCHW at every method.

    `remat`: what each UNet/SG res and transformer block keeps from its forward pass for the backward
    (`constants.REMAT_POLICIES`, `layers.remat_blocks`; "none": no rematerialisation).
    `attention`: jax.nn.dot_product_attention's implementation (None: XLA's choice; "cudnn").
    `conv_impl`: the convolution kernel of every conv (`layers.CONV_IMPLS`; "auto": im2col for small
    maps with many channels on the CPU backend, lax.conv elsewhere).
    `sg_network`: the Flax module whose params are the "sg" group, called NHWC as
    `(x_t, hint, timesteps, context) -> tuple of residuals` (one per UNet encoder skip, then the
    middle one, shaped as the skips); None: `SemanticGuidedNetwork(config, ...)`, the reference's.
    """

    def __init__(self, config: ModelConfig, dtype=jnp.float32, remat: str = "none", attention: str | None = None,
                 conv_impl: str = "auto", sg_network: nn.Module | None = None):
        self.config = config
        self.dtype = dtype
        # what the params' shapes follow, abstract_params being traced once per value: the config alone (dtype,
        # remat, attention and conv_impl change how the params are used, not their shapes), unless the SG
        # network is the caller's
        self._params_config = None if sg_network is not None else config
        self.unet = UNet(config.unet, dtype=dtype, remat=remat, attention=attention, conv_impl=conv_impl)
        self.sg = sg_network if sg_network is not None else SemanticGuidedNetwork(
            config, dtype=dtype, remat=remat, attention=attention, conv_impl=conv_impl)
        self.vae = AutoencoderKL(config.vae, dtype=dtype, conv_impl=conv_impl)

    # ---- parameters ---------------------------------------------------------------------------
    def init(self, seed: int = 0, sg_from_unet: bool = True) -> Params:
        """Fresh parameters with the reference's initialisation (PyTorch defaults, the layers
        ldm zero-initialises zero), filled on the host (models/init.py). With `sg_from_unet` the
        SG network copies the UNet encoder/middle by name, as the reference's build_model.py."""
        params = jax.tree.map(jnp.asarray, init_params(self.abstract_params(boxed=True), seed))
        return copy_unet_into_sg(params) if sg_from_unet else params

    def init_flax(self, rng, sg_from_unet: bool = True) -> Params:
        """The same initialisation through the Flax modules' own initialisers (used to check
        `init`), run op by op: 12 s for the tiny config on a CPU, where compiling them took 31 s."""
        params = meta.unbox(self._init_boxed(rng))
        return copy_unet_into_sg(params) if sg_from_unet else params

    def _init_boxed(self, rng) -> Params:
        """The Flax modules' init without a forward pass (`lazy_init` of abstract inputs, batch 1):
        the params of zero-initialised layers boxed in `ZeroInit`."""
        c = self.config
        lat, img = c.latent_size, c.image_size
        x = jax.ShapeDtypeStruct((1, lat, lat, c.latent_channels), jnp.float32)
        hint = jax.ShapeDtypeStruct((1, img, img, c.hint_channels), jnp.float32)
        t = jax.ShapeDtypeStruct((1,), jnp.int32)
        ctx = jax.ShapeDtypeStruct((1, c.context_len, c.unet.context_dim), jnp.float32)
        image = jax.ShapeDtypeStruct((1, img, img, c.vae.in_channels), jnp.float32)
        k_unet, k_sg, k_vae = jax.random.split(rng, 3)
        return {"unet": self.unet.lazy_init(k_unet, x, t, ctx)["params"],
                "sg": self.sg.lazy_init(k_sg, x, hint, t, ctx)["params"],
                "vae": self.vae.lazy_init(k_vae, image)["params"]}

    def abstract_params(self, boxed: bool = False) -> Params:
        """Shapes and dtypes of the params (jax.ShapeDtypeStruct leaves), without computing.
        `boxed`: the leaves of zero-initialised layers stay boxed in `ZeroInit` (what
        models/init.py's `init_params` reads the zero pattern from)."""
        specs = (jax.eval_shape(self._init_boxed, jax.random.key(0)) if self._params_config is None
                 else _abstract_boxed_params(self._params_config))
        return specs if boxed else meta.unbox(specs)

    # ---- input validation ---------------------------------------------------------------------
    def _check_latent(self, name, z):
        c = self.config
        _check(name, z, (None, c.latent_channels, c.latent_size, c.latent_size),
               f" (NCHW latent for {c.image_size}x{c.image_size} images)")

    def _check_image(self, name, x, channels):
        c = self.config
        _check(name, x, (None, channels, c.image_size, c.image_size),
               f" (NCHW; the hint/image is {c.vae.downsample_factor}x the latent size)")

    def _context(self, context, batch):
        c = self.config
        _check("context", context, (None, c.context_len, c.unet.context_dim))
        if context.shape[0] not in (1, batch):
            raise ValueError(f"DiAD: argument `context` has batch {context.shape[0]}, expected 1 or {batch}")
        return jnp.broadcast_to(context, (batch,) + context.shape[1:])

    def _timesteps(self, t, batch):
        t = jnp.asarray(t)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (batch,))
        _check("timesteps", t, (batch,))
        return t

    # ---- the model ----------------------------------------------------------------------------
    def encode_moments(self, params: Params, images):
        """VAE posterior (mean, logvar) of NCHW images, NCHW, unscaled, float32; logvar clipped to
        [-30, 20] (`AutoencoderKL.encode`)."""
        self._check_image("images", images, self.config.vae.in_channels)
        mean, logvar = self.vae.apply({"params": params["vae"]}, to_nhwc(images),
                                      method=AutoencoderKL.encode)
        return to_nchw(mean), to_nchw(logvar)

    def encode(self, params: Params, images, rng=None):
        """Scaled latent z = scale_factor * posterior sample (the mean when `rng` is None)."""
        mean, logvar = self.encode_moments(params, images)
        z = mean
        if rng is not None:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        return self.config.scale_factor * z

    def encoder_features(self, params: Params, images):
        """The VAE encoder's down-level activations of NCHW images (NHWC, finest first)."""
        self._check_image("images", images, self.config.vae.in_channels)
        return self.vae.apply({"params": params["vae"]}, to_nhwc(images), method=AutoencoderKL.encoder_features)

    def decode(self, params: Params, z):
        """Image (NCHW, normalised space) from a scaled latent."""
        self._check_latent("z", z)
        out = self.vae.apply({"params": params["vae"]}, to_nhwc(z / self.config.scale_factor),
                             method=AutoencoderKL.decode)
        return to_nchw(out)

    def control(self, params: Params, x_t, timesteps, context, hint):
        """The SG network's residuals (NCHW): one per UNet encoder skip, then the middle one."""
        outs = self._control_nhwc(params, x_t, timesteps, context, hint)
        return tuple(to_nchw(o) for o in outs)

    def _control_nhwc(self, params, x_t, timesteps, context, hint):
        self._check_latent("x_t", x_t)
        self._check_image("hint", hint, self.config.hint_channels)
        b = x_t.shape[0]
        if hint.shape[0] != b:
            raise ValueError(f"DiAD: argument `hint` has batch {hint.shape[0]}, expected {b} (as x_t)")
        return self.sg.apply({"params": params["sg"]}, to_nhwc(x_t), to_nhwc(hint),
                             self._timesteps(timesteps, b), self._context(context, b))

    def eps(self, params: Params, x_t, timesteps, context, hint, only_mid_control: bool | None = None):
        """Predicted noise for the noisy latent x_t (NCHW), as DiAD's apply_model."""
        omc = self.config.only_mid_control if only_mid_control is None else only_mid_control
        control = self._control_nhwc(params, x_t, timesteps, context, hint)
        b = x_t.shape[0]
        out = self.unet.apply({"params": params["unet"]}, to_nhwc(x_t),
                              self._timesteps(timesteps, b), self._context(context, b),
                              control=control, only_mid_control=omc)
        return to_nchw(out).astype(jnp.float32)

    def unet_eps(self, params: Params, x_t, timesteps, context, control=None,
                 only_mid_control: bool | None = None):
        """The controlled UNet alone, with residuals given NCHW (as `control` returns them)."""
        omc = self.config.only_mid_control if only_mid_control is None else only_mid_control
        self._check_latent("x_t", x_t)
        b = x_t.shape[0]
        ctrl = None if control is None else tuple(to_nhwc(c) for c in control)
        out = self.unet.apply({"params": params["unet"]}, to_nhwc(x_t),
                              self._timesteps(timesteps, b), self._context(context, b),
                              control=ctrl, only_mid_control=omc)
        return to_nchw(out).astype(jnp.float32)


# ---- parameter helpers ------------------------------------------------------------------------
# Trainable subsets by name: regexes over "/"-joined param paths ("group/module/.../leaf", as
# sharding.PARTITION_RULES), a param trains when one of them matches its whole path.
TRAINABLE_PATTERNS: dict[str, tuple[str, ...]] = {
    # The reference: the SG network (its fusion block included) and the UNet decoder (output_blocks,
    # out); the UNet encoder, middle block and time embedding, and the VAE stay frozen.
    "reference": (r"sg/.*", r"unet/(output_blocks_\d+_\d+|out_\d+)/.*"),
    # The SG network and the WHOLE UNet. Not the reference's recipe (its UNet encoder is pretrained SD
    # and stays frozen); for models trained from scratch, such as the embedded demo, whose random UNet
    # encoder would otherwise stay random.
    "sg+unet": (r"sg/.*", r"unet/.*"),
}


def mask_from_patterns(params: Params, patterns: tuple[str, ...]):
    """Pytree of bools shaped like `params`: True where one of `patterns` (regexes) matches the whole
    "/"-joined path. A pattern that matches no param is an error naming it (a typo must not leave
    parameters frozen silently)."""
    flat = traverse_util.flatten_dict(params)
    paths = {k: "/".join(k) for k in flat}
    unused = [p for p in patterns if not any(re.fullmatch(p, s) for s in paths.values())]
    if unused:
        raise ConfigError(f"trainable patterns {unused} match no parameter (groups: {sorted(params)})")
    return traverse_util.unflatten_dict(
        {k: any(re.fullmatch(p, s) for p in patterns) for k, s in paths.items()})


# name -> function of the params giving the trainable mask (TrainConfig.trainable picks one)
TRAINABLE_MASKS = {name: functools.partial(mask_from_patterns, patterns=patterns)
                   for name, patterns in TRAINABLE_PATTERNS.items()}
trainable_mask = TRAINABLE_MASKS["reference"]  # the reference's: the SG network and the UNet decoder


def partition(params: Params, mask=None):
    """Split params into (trainable, frozen) dicts of the same nesting (missing leaves absent)."""
    mask = trainable_mask(params) if mask is None else mask
    flat = traverse_util.flatten_dict(params)
    fmask = traverse_util.flatten_dict(mask)
    train = {k: v for k, v in flat.items() if fmask[k]}
    frozen = {k: v for k, v in flat.items() if not fmask[k]}
    return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def combine(trainable: Params, frozen: Params) -> Params:
    flat = traverse_util.flatten_dict(frozen)
    flat.update(traverse_util.flatten_dict(trainable))
    return traverse_util.unflatten_dict(flat)


def copy_unet_into_sg(params: Params) -> Params:
    """Initialise every SG parameter that has a UNet counterpart of the same name and shape
    (time embedding, input blocks, middle block) from the UNet, as build_model.py does."""
    unet = traverse_util.flatten_dict(params["unet"])
    sg = traverse_util.flatten_dict(params["sg"])
    for k in sg:
        if k in unet and unet[k].shape == sg[k].shape:
            sg[k] = unet[k]
    out = dict(params)
    out["sg"] = traverse_util.unflatten_dict(sg)
    return out


@traced_once
def _abstract_boxed_params(config: ModelConfig) -> Params:
    """`DiAD(config, ...).abstract_params(boxed=True)` of the reference's SG network, traced once per config
    (with the default options: any other dtype, remat, attention or conv_impl gives the same params)."""
    return jax.eval_shape(DiAD(config)._init_boxed, jax.random.key(0))
