"""ResNet-50 feature extractor (frozen, BatchNorm in inference mode), NHWC.

The reference scores with timm's `resnet50` (`features_only=True`) and uses its stages
layer1, layer2, layer3 (256, 512, 1024 channels at 1/4, 1/8, 1/16 of the input size). Only those
stages are built; layer4 and fc are not needed. Parameter names follow timm/torchvision
(`layer1.0.downsample.1.running_mean` -> layer1_0 / downsample_1 / mean), so the same key rule as
the diffusion model converts them.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from diad_jax.models.init import traced_once
from diad_jax.models.layers import Conv

Dtype = Any


class FrozenBatchNorm(nn.Module):
    """torch BatchNorm2d in eval mode: (x - running_mean) / sqrt(running_var + eps) * w + b."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        mean = self.param("mean", nn.initializers.zeros, (c,), jnp.float32)
        var = self.param("var", nn.initializers.ones, (c,), jnp.float32)
        inv = jax.lax.rsqrt(var + self.epsilon) * scale
        return (x.astype(jnp.float32) * inv + (bias - mean * inv)).astype(x.dtype)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), as timm and torchvision."""

    width: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        out_ch = 4 * self.width
        h = nn.relu(FrozenBatchNorm(name="bn1")(
            Conv(self.width, 1, padding=0, use_bias=False, dtype=self.dtype, name="conv1")(x)))
        h = nn.relu(FrozenBatchNorm(name="bn2")(
            Conv(self.width, 3, stride=self.stride, padding=1, use_bias=False, dtype=self.dtype,
                 name="conv2")(h)))
        h = FrozenBatchNorm(name="bn3")(
            Conv(out_ch, 1, padding=0, use_bias=False, dtype=self.dtype, name="conv3")(h))
        if self.stride != 1 or x.shape[-1] != out_ch:
            x = FrozenBatchNorm(name="downsample_1")(
                Conv(out_ch, 1, stride=self.stride, padding=0, use_bias=False, dtype=self.dtype,
                     name="downsample_0")(x))
        return nn.relu(h + x.astype(h.dtype))


class ResNet50Features(nn.Module):
    """Returns (layer1, layer2, layer3) feature maps, NHWC, for NHWC input."""

    blocks: tuple[int, ...] = (3, 4, 6)
    widths: tuple[int, ...] = (64, 128, 256)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = Conv(64, 7, stride=2, padding=3, use_bias=False, dtype=self.dtype, name="conv1")(
            x.astype(self.dtype))
        h = nn.relu(FrozenBatchNorm(name="bn1")(h))
        h = nn.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        feats = []
        for stage, (n, width) in enumerate(zip(self.blocks, self.widths)):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                h = Bottleneck(width, stride, dtype=self.dtype, name=f"layer{stage + 1}_{i}")(h)
            feats.append(h)
        return tuple(feats)


@traced_once
def resnet_abstract_params(image_size: int = 256):
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda: ResNet50Features().init(jax.random.key(0), jnp.zeros(x.shape)))["params"]
