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

import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from diad_jax.configs import ModelConfig
from diad_jax.models.init import init_params
from diad_jax.models.sd import AutoencoderKL, UNet
from diad_jax.models.sg_network import SemanticGuidedNetwork

Params = dict[str, Any]

# The reference trains the SG network and the UNet decoder (output_blocks + out); the UNet
# encoder, middle block and time embedding, and the VAE stay frozen.
_TRAINABLE_UNET = re.compile(r"^(output_blocks_\d+_\d+|out_\d+)$")


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
    """The DiAD model as pure functions of its params. NCHW at every method."""

    def __init__(self, config: ModelConfig, dtype=jnp.float32, remat: bool = False, attention: str | None = None):
        """`attention`: jax.nn.dot_product_attention's implementation (None: XLA's choice; "cudnn")."""
        self.config = config
        self.dtype = dtype
        self.unet = UNet(config.unet, dtype=dtype, remat=remat, attention=attention)
        self.sg = SemanticGuidedNetwork(config, dtype=dtype, remat=remat, attention=attention)
        self.vae = AutoencoderKL(config.vae, dtype=dtype)

    # ---- parameters ---------------------------------------------------------------------------
    def _dummy(self, batch: int = 1):
        c = self.config
        lat, img = c.latent_size, c.image_size
        return dict(
            x=jnp.zeros((batch, lat, lat, c.latent_channels), jnp.float32),
            hint=jnp.zeros((batch, img, img, c.hint_channels), jnp.float32),
            img=jnp.zeros((batch, img, img, c.vae.in_channels), jnp.float32),
            t=jnp.zeros((batch,), jnp.int32),
            ctx=jnp.zeros((batch, c.context_len, c.unet.context_dim), jnp.float32),
        )

    def init(self, seed: int = 0, sg_from_unet: bool = True) -> Params:
        """Fresh parameters with the reference's initialisation (PyTorch defaults, the layers
        ldm zero-initialises zero), filled on the host (models/init.py). With `sg_from_unet` the
        SG network copies the UNet encoder/middle by name, as the reference's build_model.py."""
        params = jax.tree.map(jnp.asarray, init_params(self.abstract_params(), seed))
        return copy_unet_into_sg(params) if sg_from_unet else params

    def init_flax(self, rng, sg_from_unet: bool = True) -> Params:
        """The same initialisation through the Flax modules' own initialisers (slow: compiles
        the forward pass; used to check `init`)."""
        d = self._dummy()
        k_unet, k_sg, k_vae = jax.random.split(rng, 3)

        @jax.jit
        def _init(k_unet, k_sg, k_vae):
            unet = self.unet.init(k_unet, d["x"], d["t"], d["ctx"])["params"]
            sg = self.sg.init(k_sg, d["x"], d["hint"], d["t"], d["ctx"])["params"]
            vae = self.vae.init(k_vae, d["img"])["params"]
            return {"unet": unet, "sg": sg, "vae": vae}

        params = _init(k_unet, k_sg, k_vae)
        return copy_unet_into_sg(params) if sg_from_unet else params

    def abstract_params(self) -> Params:
        """Shapes and dtypes of the params (jax.ShapeDtypeStruct leaves), without computing."""
        return jax.eval_shape(lambda: self.init_flax(jax.random.key(0), sg_from_unet=False))

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
def trainable_mask(params: Params):
    """Pytree of bools: True for the SG network and the UNet decoder (output_blocks, out)."""
    def mark(group, tree):
        if group == "sg":
            return jax.tree.map(lambda _: True, tree)
        if group == "unet":
            return {k: jax.tree.map(lambda _, t=bool(_TRAINABLE_UNET.match(k)): t, v)
                    for k, v in tree.items()}
        return jax.tree.map(lambda _: False, tree)
    return {g: mark(g, t) for g, t in params.items()}


def sg_and_unet_mask(params: Params):
    """Pytree of bools: True for the SG network and the WHOLE UNet. Not the reference's recipe
    (its UNet encoder is pretrained SD and stays frozen); for models trained from scratch, such as
    the embedded demo, whose random UNet encoder would otherwise stay random."""
    return {g: jax.tree.map(lambda _, on=g in ("sg", "unet"): on, t) for g, t in params.items()}


TRAINABLE_MASKS = {"reference": trainable_mask, "sg+unet": sg_and_unet_mask}


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
