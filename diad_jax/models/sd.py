"""Stable Diffusion parts in Flax: the SD v1.5 UNet (ldm `UNetModel`, controlled as DiAD does)
and the ldm KL autoencoder. NHWC inside; `DiAD` (models/diad.py) is the NCHW public API.

These are our own modules rather than diffusers' Flax ones: diffusers 0.39's Flax transformer
block uses a GroupNorm epsilon of 1e-5 (ldm: 1e-6) and the tanh-approximated GELU (ldm: exact
erf), so it cannot reproduce the reference to float precision; it is also removed upstream
(diffusers 0.40). diffusers' PyTorch models remain the independent parity oracle in the tests.
Parameter names mirror the ldm checkpoint names (see `diad_jax.convert.keys`).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from diad_jax.configs import UNetConfig, VAEConfig
from diad_jax.models.layers import Conv, Dense, Downsample, GroupNorm, Upsample, remat_blocks, timestep_embedding

Dtype = Any


# ------------------------------------------------------------------------------------------------
# UNet pieces shared with the SG network (called inside a compact __call__, so the submodules
# they create belong to the caller and carry the ldm names).
# ------------------------------------------------------------------------------------------------
def time_embedding(cfg: UNetConfig, timesteps, dtype):
    t_emb = timestep_embedding(timesteps, cfg.model_channels)
    emb = Dense(cfg.time_embed_dim, dtype=dtype, name="time_embed_0")(t_emb)
    return Dense(cfg.time_embed_dim, dtype=dtype, name="time_embed_2")(nn.silu(emb))


def _attention_heads(cfg: UNetConfig) -> int:
    return cfg.num_heads  # legacy=False, use_spatial_transformer: dim_head = channels // heads


def unet_encoder(cfg: UNetConfig, x, emb, context, dtype, hint=None, remat: str = "none",
                 attention: str | None = None, conv_impl: str = "auto"):
    """The input blocks. Returns the final activation and every block's output (the skips).

    `hint`, when given, is added to the output of the first conv (ControlNet / SG network)."""
    res_block, transformer = remat_blocks(remat)
    h = Conv(cfg.model_channels, 3, dtype=dtype, conv_impl=conv_impl, name="input_blocks_0_0")(x)
    if hint is not None:
        h = h + hint.astype(h.dtype)
    skips = [h]
    idx = 1
    for level in range(cfg.num_levels):
        ch = cfg.level_channels(level)
        for _ in range(cfg.num_res_blocks):
            h = res_block(ch, cfg.norm_groups, dtype=dtype, conv_impl=conv_impl, name=f"input_blocks_{idx}_0")(h, emb)
            if cfg.has_attention(level):
                h = transformer(_attention_heads(cfg), cfg.transformer_depth, cfg.norm_groups,
                                dtype=dtype, attention=attention, name=f"input_blocks_{idx}_1")(h, context)
            skips.append(h)
            idx += 1
        if level != cfg.num_levels - 1:
            h = Downsample(dtype=dtype, conv_impl=conv_impl, name=f"input_blocks_{idx}_0")(h)
            skips.append(h)
            idx += 1
    return h, skips


def unet_middle(cfg: UNetConfig, h, emb, context, dtype, remat: str = "none", attention: str | None = None,
                conv_impl: str = "auto"):
    res_block, transformer = remat_blocks(remat)
    ch = h.shape[-1]
    h = res_block(ch, cfg.norm_groups, dtype=dtype, conv_impl=conv_impl, name="middle_block_0")(h, emb)
    h = transformer(_attention_heads(cfg), cfg.transformer_depth, cfg.norm_groups, dtype=dtype,
                    attention=attention, name="middle_block_1")(h, context)
    return res_block(ch, cfg.norm_groups, dtype=dtype, conv_impl=conv_impl, name="middle_block_2")(h, emb)


def controlled_skip_indices(cfg: UNetConfig, only_mid_control: bool) -> tuple[int, ...]:
    """Encoder skips that receive an SG residual.

    only_mid_control=False: all of them. True (DiAD's modified meaning, sgn.py): only the skips
    popped by the first decoder blocks, i.e. the lowest-resolution level (reference: 9, 10, 11)."""
    levels = cfg.skip_levels()
    if not only_mid_control:
        return tuple(range(len(levels)))
    return tuple(i for i, lv in enumerate(levels) if lv == cfg.num_levels - 1)


class UNet(nn.Module):
    """The SD UNet as DiAD's `ControlledUnetModel` runs it.

    `control` is the SG network's output: one residual per encoder skip plus the middle one
    (last). The middle residual is always added; skip residuals follow `only_mid_control`
    (see `controlled_skip_indices`). Inputs NHWC; returns eps NHWC."""

    config: UNetConfig
    dtype: Dtype = jnp.float32
    remat: str = "none"           # what each block keeps for the backward pass (layers.remat_blocks)
    attention: str | None = None  # jax.nn.dot_product_attention's implementation (layers.CrossAttention)
    conv_impl: str = "auto"       # the convolution kernel (layers.CONV_IMPLS)

    @nn.compact
    def __call__(self, x, timesteps, context, control: Sequence[jax.Array] | None = None,
                 only_mid_control: bool = True):
        cfg, dtype = self.config, self.dtype
        res_block, transformer = remat_blocks(self.remat)
        emb = time_embedding(cfg, timesteps, dtype)
        context = context.astype(dtype)
        h, skips = unet_encoder(cfg, x.astype(dtype), emb, context, dtype, remat=self.remat,
                                attention=self.attention, conv_impl=self.conv_impl)
        h = unet_middle(cfg, h, emb, context, dtype, remat=self.remat, attention=self.attention,
                        conv_impl=self.conv_impl)
        controlled = set()
        if control is not None:
            if len(control) != len(skips) + 1:
                raise ValueError(f"UNet: control has {len(control)} residuals, expected "
                                 f"{len(skips) + 1} (one per encoder skip plus the middle)")
            h = h + control[-1].astype(h.dtype)
            controlled = set(controlled_skip_indices(cfg, only_mid_control))

        idx = 0
        for level in reversed(range(cfg.num_levels)):
            ch = cfg.level_channels(level)
            for i in range(cfg.num_res_blocks + 1):
                k = len(skips) - 1
                skip = skips.pop()
                if k in controlled:
                    skip = skip + control[k].astype(skip.dtype)
                h = jnp.concatenate([h, skip.astype(h.dtype)], axis=-1)
                h = res_block(ch, cfg.norm_groups, dtype=dtype, conv_impl=self.conv_impl,
                              name=f"output_blocks_{idx}_0")(h, emb)
                n_layers = 1
                if cfg.has_attention(level):
                    h = transformer(_attention_heads(cfg), cfg.transformer_depth, cfg.norm_groups,
                                    dtype=dtype, attention=self.attention, name=f"output_blocks_{idx}_1")(h, context)
                    n_layers = 2
                if level and i == cfg.num_res_blocks:
                    h = Upsample(dtype=dtype, conv_impl=self.conv_impl, name=f"output_blocks_{idx}_{n_layers}")(h)
                idx += 1
        h = nn.silu(GroupNorm(cfg.norm_groups, 1e-5, name="out_0")(h))
        return Conv(cfg.out_channels, 3, zero=True, dtype=dtype, conv_impl=self.conv_impl, name="out_2")(h)


# ------------------------------------------------------------------------------------------------
# The ldm KL autoencoder (ldm/modules/diffusionmodules/model.py): GroupNorm eps 1e-6 throughout.
# ------------------------------------------------------------------------------------------------
class VAEResnetBlock(nn.Module):
    out_channels: int
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        h = nn.silu(GroupNorm(self.norm_groups, 1e-6, name="norm1")(x))
        h = Conv(self.out_channels, 3, dtype=self.dtype, conv_impl=self.conv_impl, name="conv1")(h)
        h = nn.silu(GroupNorm(self.norm_groups, 1e-6, name="norm2")(h))
        h = Conv(self.out_channels, 3, dtype=self.dtype, conv_impl=self.conv_impl, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, 1, dtype=self.dtype, name="nin_shortcut")(x)
        return x.astype(h.dtype) + h


class VAEAttnBlock(nn.Module):
    """Single-head self-attention over H*W with 1x1 conv projections."""

    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        h = GroupNorm(self.norm_groups, 1e-6, name="norm")(x)
        q, k, v = (Conv(c, 1, dtype=self.dtype, name=n)(h).reshape(b, hh * ww, 1, c)
                   for n in ("q", "k", "v"))
        out = jax.nn.dot_product_attention(q, k, v, scale=c ** -0.5).reshape(b, hh, ww, c)
        return x.astype(out.dtype) + Conv(c, 1, dtype=self.dtype, name="proj_out")(out)


class VAEMid(nn.Module):
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        ch = x.shape[-1]
        x = VAEResnetBlock(ch, self.norm_groups, self.dtype, self.conv_impl, name="block_1")(x)
        x = VAEAttnBlock(self.norm_groups, self.dtype, name="attn_1")(x)
        return VAEResnetBlock(ch, self.norm_groups, self.dtype, self.conv_impl, name="block_2")(x)


class VAEDownLevel(nn.Module):
    out_channels: int
    num_res_blocks: int
    downsample: bool
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_res_blocks):
            x = VAEResnetBlock(self.out_channels, self.norm_groups, self.dtype, self.conv_impl, name=f"block_{j}")(x)
        if self.downsample:
            x = _VAEDownsample(self.dtype, self.conv_impl, name="downsample")(x)
        return x


class _VAEDownsample(nn.Module):
    """ldm autoencoder downsample: pad right/bottom by one, 3x3 conv stride 2, no padding."""

    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        return Conv(x.shape[-1], 3, stride=2, padding=((0, 1), (0, 1)), dtype=self.dtype, conv_impl=self.conv_impl,
                    name="conv")(x)


class VAEUpLevel(nn.Module):
    out_channels: int
    num_blocks: int
    upsample: bool
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_blocks):
            x = VAEResnetBlock(self.out_channels, self.norm_groups, self.dtype, self.conv_impl, name=f"block_{j}")(x)
        if self.upsample:
            x = Upsample(dtype=self.dtype, conv_impl=self.conv_impl, name="upsample")(x)
        return x


class VAEEncoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, features: bool = False):
        """The posterior moments' features, or with `features=True` the output of each down level."""
        cfg, conv_impl = self.config, self.conv_impl
        h = Conv(cfg.ch, 3, dtype=self.dtype, conv_impl=conv_impl, name="conv_in")(x.astype(self.dtype))
        n = len(cfg.ch_mult)
        levels = []
        for i, mult in enumerate(cfg.ch_mult):
            h = VAEDownLevel(cfg.ch * mult, cfg.num_res_blocks, i != n - 1, cfg.norm_groups,
                             self.dtype, conv_impl, name=f"down_{i}")(h)
            levels.append(h)
        if features:
            return levels
        h = VAEMid(cfg.norm_groups, self.dtype, conv_impl, name="mid")(h)
        h = nn.silu(GroupNorm(cfg.norm_groups, 1e-6, name="norm_out")(h))
        return Conv(2 * cfg.z_channels, 3, dtype=self.dtype, conv_impl=conv_impl, name="conv_out")(h)


class VAEDecoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, z):
        cfg, conv_impl = self.config, self.conv_impl
        n = len(cfg.ch_mult)
        h = Conv(cfg.ch * cfg.ch_mult[-1], 3, dtype=self.dtype, conv_impl=conv_impl, name="conv_in")(
            z.astype(self.dtype))
        h = VAEMid(cfg.norm_groups, self.dtype, conv_impl, name="mid")(h)
        for i in reversed(range(n)):
            h = VAEUpLevel(cfg.ch * cfg.ch_mult[i], cfg.num_res_blocks + 1, i != 0, cfg.norm_groups,
                           self.dtype, conv_impl, name=f"up_{i}")(h)
        h = nn.silu(GroupNorm(cfg.norm_groups, 1e-6, name="norm_out")(h))
        return Conv(cfg.out_channels, 3, dtype=self.dtype, conv_impl=conv_impl, name="conv_out")(h)


class AutoencoderKL(nn.Module):
    """ldm AutoencoderKL. `encode` returns the posterior's (mean, logvar), float32, logvar clipped to
    [-30, 20] as ldm's DiagonalGaussianDistribution does (the one place it is clipped: training,
    fine-tuning and scoring all sample through it); `decode` maps a latent (unscaled, i.e.
    z / scale_factor) back to image space. NHWC."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"  # the convolution kernel (layers.CONV_IMPLS)

    def setup(self):
        cfg = self.config
        self.encoder = VAEEncoder(cfg, self.dtype, self.conv_impl)
        self.decoder = VAEDecoder(cfg, self.dtype, self.conv_impl)
        self.quant_conv = Conv(2 * cfg.embed_dim, 1, dtype=self.dtype)
        self.post_quant_conv = Conv(cfg.z_channels, 1, dtype=self.dtype)

    def encode(self, x):
        moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(jnp.float32)

    def encoder_features(self, x):
        """The encoder's down-level outputs (NHWC, finest first), e.g. to compare two images."""
        return self.encoder(x, features=True)

    def __call__(self, x):
        mean, _ = self.encode(x)
        return self.decode(mean)
