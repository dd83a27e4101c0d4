"""DiAD's Semantic-Guided (SG) network (sgn/sgn.py `SemanticGuidedNetwork`), NHWC.

A ControlNet-style trainable copy of the UNet encoder and middle block. The RGB input image
(the "hint") is encoded by a small conv stack to the latent grid and added after the first conv;
each encoder output passes a zero-initialised 1x1 conv, and so does the middle output. A fusion
block (`ModelConfig.fusion`) then mixes the encoder residuals; the reference's is the
Spatial-aware Feature Fusion (SFF, `SpatialFeatureFusion`), which fuses the second-lowest-resolution
residuals into the lowest-resolution ones (spec section 2):

    outs[t_j] = SiLU(outs[t_j] + sum_i D_ij(outs[s_i]))
    D_ij = SiLU(InstanceNorm(conv3x3_stride2_nobias(x)))      (conv zero-initialised)

Channels and indices are derived from the config (reference: sources 6, 7, 8 with 640/1280/1280
channels, targets 9, 10, 11 with 1280). With fusion "none" the residuals pass unchanged.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import flax.linen as nn

from diad_jax.configs import ModelConfig
from diad_jax.models.layers import Conv, instance_norm
from diad_jax.models.sd import time_embedding, unet_encoder, unet_middle

Dtype = Any


class SpatialFeatureFusion(nn.Module):
    """The SFF block: residuals in, the same residuals with `targets` fused from `sources` out.

    Its convs D_ij are named `down{i+1}{j+1}_0` (ldm's `down{i+1}{j+1}.0`). The SG network shares
    its scope with this module, so they sit at the top level of the SG params as in the reference."""

    sources: tuple[int, ...]
    targets: tuple[int, ...]
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, outs):
        fused = list(outs)
        for j, t in enumerate(self.targets):
            acc = outs[t]
            for i, s in enumerate(self.sources):
                y = Conv(outs[t].shape[-1], 3, stride=2, padding=1, use_bias=False, zero=True,
                         dtype=self.dtype, conv_impl=self.conv_impl, name=f"down{i + 1}{j + 1}_0")(outs[s])
                acc = acc + nn.silu(instance_norm(y))
            fused[t] = nn.silu(acc)
        return fused


class SemanticGuidedNetwork(nn.Module):
    """Returns the SG residuals: one per UNet encoder skip (after the fusion block) plus the middle one."""

    config: ModelConfig
    dtype: Dtype = jnp.float32
    remat: str = "none"           # what each block keeps for the backward pass (layers.remat_blocks)
    attention: str | None = None  # jax.nn.dot_product_attention's implementation (layers.CrossAttention)
    conv_impl: str = "auto"       # the convolution kernel (layers.CONV_IMPLS)

    @nn.compact
    def __call__(self, x, hint, timesteps, context):
        mc = self.config
        cfg, dtype = mc.unet, self.dtype
        emb = time_embedding(cfg, timesteps, dtype)
        context = context.astype(dtype)
        guided_hint = self._hint(hint)
        h, skips = unet_encoder(cfg, x.astype(dtype), emb, context, dtype, hint=guided_hint,
                                remat=self.remat, attention=self.attention, conv_impl=self.conv_impl)
        outs = [Conv(s.shape[-1], 1, zero=True, dtype=dtype, name=f"zero_convs_{k}_0")(s)
                for k, s in enumerate(skips)]
        if mc.fusion == "sff":
            sff = SpatialFeatureFusion(mc.sff_sources(), mc.sff_targets(), dtype=dtype, conv_impl=self.conv_impl)
            nn.share_scope(sff, self)  # its convs keep the reference's top-level names
            outs = sff(outs)
        h = unet_middle(cfg, h, emb, context, dtype, remat=self.remat, attention=self.attention,
                        conv_impl=self.conv_impl)
        outs.append(Conv(h.shape[-1], 1, zero=True, dtype=dtype, name="middle_block_out_0")(h))
        return tuple(outs)

    def _hint(self, hint):
        """Hint encoder (input_hint_block.{0,2,...}): conv hint->c0, then per next width a conv
        c->c and a stride-2 conv c->c', SiLU between, then a zero conv to model_channels."""
        h = hint.astype(self.dtype)
        widths = self.config.hint_block_channels
        specs = [(widths[0], 1)]
        for a, b in zip(widths[:-1], widths[1:]):
            specs += [(a, 1), (b, 2)]
        for n, (features, stride) in enumerate(specs):
            h = nn.silu(Conv(features, 3, stride=stride, padding=1, dtype=self.dtype, conv_impl=self.conv_impl,
                             name=f"input_hint_block_{2 * n}")(h))
        return Conv(self.config.unet.model_channels, 3, padding=1, zero=True, dtype=self.dtype,
                    conv_impl=self.conv_impl, name=f"input_hint_block_{2 * len(specs)}")(h)
