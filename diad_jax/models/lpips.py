"""LPIPS (VGG16 variant, as taming-transformers' `LPIPS` that ldm's autoencoder loss uses), in Flax.

    lpips = LPIPS()
    params = lpips_params_from_state_dicts(vgg, lin)     # autoencoder.load_lpips_params reads the files
    d = lpips.apply({"params": params}, x_nhwc, y_nhwc)  # (B,) perceptual distances

Weights: `vgg` is torchvision's VGG16 ImageNet state dict (`vgg16-397923af.pth`, keys
features.N.weight/bias; the classifier is ignored); `lin` is LPIPS's linear-layer state dict for VGG
(`vgg.pth` of taming-transformers / richzhang's lpips v0.1, keys lin0..lin4.model.1.weight).

Forward, as taming's LPIPS: scale the inputs ((x - shift) / scale with LPIPS's constants), take
VGG16 relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, normalise each over channels
(x / (||x|| + 1e-10)), square the difference, apply the 1x1 no-bias "lin" conv, average over space,
sum over the five layers.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diad_jax.models.init import traced_once

# torchvision vgg16.features: conv indices per block (ReLU after each, max-pool between blocks)
VGG16_BLOCKS = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
VGG16_CHANNELS = (64, 128, 256, 512, 512)
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)


class VGG16Features(nn.Module):
    """The five LPIPS taps of torchvision's VGG16 (NHWC in, NHWC out)."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = x.astype(self.dtype)
        taps = []
        for b, (idxs, ch) in enumerate(zip(VGG16_BLOCKS, VGG16_CHANNELS)):
            if b > 0:
                h = nn.max_pool(h, (2, 2), strides=(2, 2))
            for i in idxs:
                h = nn.relu(nn.Conv(ch, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=f"features_{i}")(h))
            taps.append(h)
        return taps


class LPIPS(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, y):
        """x, y: NHWC images in the range LPIPS expects ([-1, 1]; ldm passes its model inputs as they
        are). Returns (B,) distances."""
        shift, scale = jnp.asarray(SHIFT), jnp.asarray(SCALE)
        net = VGG16Features(self.dtype, name="net")
        fx = net((x - shift) / scale)
        fy = net((y - shift) / scale)
        total = 0.0
        for k, (a, b) in enumerate(zip(fx, fy)):
            a, b = a.astype(jnp.float32), b.astype(jnp.float32)
            a = a / (jnp.sqrt(jnp.sum(a * a, axis=-1, keepdims=True)) + 1e-10)
            b = b / (jnp.sqrt(jnp.sum(b * b, axis=-1, keepdims=True)) + 1e-10)
            d = nn.Conv(1, (1, 1), use_bias=False, name=f"lin{k}")(jnp.square(a - b))
            total = total + jnp.mean(d, axis=(1, 2, 3))
        return total


@traced_once
def lpips_abstract_params(image_size: int = 64):
    """ShapeDtypeStructs of LPIPS's params (they do not depend on the image size)."""
    x = jnp.zeros((1, image_size, image_size, 3))
    return jax.eval_shape(lambda: LPIPS().init(jax.random.key(0), x, x))["params"]


def lpips_params_from_state_dicts(vgg: dict, lin: dict) -> dict:
    """Flax params from torch-named arrays (OIHW conv weights)."""
    def arr(d, k):
        if k not in d:
            raise KeyError(f"LPIPS weights: missing key {k!r} (have e.g. {sorted(d)[:5]})")
        v = d[k]
        return np.asarray(v.numpy() if hasattr(v, "numpy") else v, np.float32)

    net = {}
    for idxs in VGG16_BLOCKS:
        for i in idxs:
            net[f"features_{i}"] = {"kernel": arr(vgg, f"features.{i}.weight").transpose(2, 3, 1, 0),
                                    "bias": arr(vgg, f"features.{i}.bias")}
    params = {"net": net}
    for k in range(len(VGG16_BLOCKS)):
        params[f"lin{k}"] = {"kernel": arr(lin, f"lin{k}.model.1.weight").transpose(2, 3, 1, 0)}
    return params
