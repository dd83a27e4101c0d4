"""Building blocks shared by the UNet, the SG network and the VAE (Flax linen, NHWC).

Module names follow the ldm checkpoint names with '.' before an index written as '_'
(`input_blocks.1.0.in_layers.2` -> `input_blocks_1_0/in_layers_2`), so the converter needs one
rule instead of a table. Numerics follow the PyTorch reference exactly (spec section 10):
norms are computed in float32 with a two-pass variance and the reference's epsilons, the
feed-forward GELU is the exact erf form, the timestep embedding is [cos, sin].

Initialisers match PyTorch's defaults (kaiming-uniform(a=sqrt(5)) kernels, uniform biases),
and the layers the reference zero-initialises are zero here (`zero=True`). Their parameters come
out of `Module.init` boxed in `ZeroInit`, so the host-side init (models/init.py) reads the zero
pattern off `jax.eval_shape` of the Flax init instead of off the layer names.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import struct
from flax.core import meta

Dtype = Any

# PyTorch's default Conv/Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for kernel and bias.
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class ZeroInit(struct.PyTreeNode, meta.AxisMetadata):
    """A parameter of a zero-initialised layer (`zero=True`) as `Module.init` returns it. The box
    carries no axis information: `self.param` inside the modules and `flax.core.meta.unbox` return
    the value itself."""

    value: Any

    def unbox(self):
        return self.value

    def replace_boxed(self, val):
        return self.replace(value=val)

    def add_axis(self, index, params):
        return self

    def remove_axis(self, index, params):
        return self


def zero_init(key, shape, dtype=jnp.float32):
    """Zeros, boxed in `ZeroInit`."""
    return ZeroInit(jnp.zeros(shape, dtype))


# Convolution kernels (`conv_impl` of the modules, `impl` of `conv2d`). XLA:CPU's convolution is
# 2-3x slower than its matrix multiply on small feature maps with many channels (the UNet's 8x8 and
# 4x4 levels at 1280 channels), so with "auto" such convs run as im2col + one matmul on the CPU
# backend; larger maps, few channels (there im2col's copies, and in training its backward, cost more
# than they save: the tiny models' train steps are ~1.5x slower with it) and every other backend
# (cuDNN, TPU) use lax.conv. "lax" or "im2col" force one implementation (a 1x1 conv is always lax's).
CONV_IMPLS = ("auto", "lax", "im2col")
IM2COL_MAX_PIXELS = 256
IM2COL_MIN_CHANNELS = 256


def _use_im2col(impl: str, h: int, w: int, k: int, c: int) -> bool:
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl == "lax" or k == 1:
        return False
    if impl == "im2col":
        return True
    return jax.default_backend() == "cpu" and h * w <= IM2COL_MAX_PIXELS and c >= IM2COL_MIN_CHANNELS


def conv2d(x, kernel, stride: int, pad, impl: str = "auto") -> jax.Array:
    """NHWC x HWIO convolution with explicit ((top, bottom), (left, right)) padding, computed by
    `impl` (one of `CONV_IMPLS`)."""
    kh, kw = kernel.shape[:2]
    n, h, w, c = x.shape
    ho = (h + pad[0][0] + pad[0][1] - kh) // stride + 1
    wo = (w + pad[1][0] + pad[1][1] - kw) // stride + 1
    if not _use_im2col(impl, ho, wo, kh * kw, c):
        return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pad,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    xp = jnp.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
    cols = jnp.concatenate([xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
                            for i in range(kh) for j in range(kw)], axis=-1)
    out = jnp.dot(cols.reshape(n * ho * wo, kh * kw * c), kernel.reshape(kh * kw * c, -1))
    return out.reshape(n, ho, wo, -1)


class Conv(nn.Module):
    """2-D convolution with explicit symmetric padding (PyTorch semantics), NHWC / HWIO.
    `conv_impl`: the kernel (`CONV_IMPLS`, see `conv2d`)."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int | Sequence[tuple[int, int]] | None = None  # default: kernel_size // 2
    use_bias: bool = True
    zero: bool = False
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        fan_in = x.shape[-1] * k * k
        pad = self.padding if self.padding is not None else k // 2
        if isinstance(pad, int):
            pad = ((pad, pad), (pad, pad))
        kernel = self.param("kernel", zero_init if self.zero else torch_kernel_init,
                            (k, k, x.shape[-1], self.features), jnp.float32)
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, pad, self.conv_impl)
        if self.use_bias:
            bias = self.param("bias", zero_init if self.zero else _torch_bias_init(fan_in),
                              (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class Dense(nn.Module):
    """Linear layer with PyTorch's default init; kernel is [in, out]."""

    features: int
    use_bias: bool = True
    zero: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        kernel = self.param("kernel", zero_init if self.zero else torch_kernel_init,
                            (fan_in, self.features), jnp.float32)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", zero_init if self.zero else _torch_bias_init(fan_in),
                              (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over NHWC, computed in float32 with a two-pass (biased) variance."""

    num_groups: int = 32
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        n, h, w, c = x.shape
        g = self.num_groups
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xg = x.astype(jnp.float32).reshape(n, h, w, g, c // g)
        mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
        centred = xg - mean
        var = jnp.mean(jnp.square(centred), axis=(1, 2, 4), keepdims=True)
        y = (centred * jax.lax.rsqrt(var + self.epsilon)).reshape(n, h, w, c)
        return (y * scale + bias).astype(x.dtype)


class LayerNorm(nn.Module):
    """torch.nn.LayerNorm over the last axis (eps 1e-5 by default), float32 two-pass."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale + bias).astype(x.dtype)


def instance_norm(x, epsilon: float = 1e-5):
    """torch.nn.InstanceNorm2d(affine=False): per sample and channel over H, W (NHWC)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
    centred = x32 - mean
    var = jnp.mean(jnp.square(centred), axis=(1, 2), keepdims=True)
    return (centred * jax.lax.rsqrt(var + epsilon)).astype(x.dtype)


def timestep_embedding(timesteps, dim: int, max_period: float = 10000.0):
    """ldm's sinusoidal embedding, [cos, sin] (diffusers: flip_sin_to_cos=True, freq_shift=0)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half
    freqs = jnp.exp(exponent)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def upsample_nearest2x(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ResBlock(nn.Module):
    """ldm openaimodel ResBlock (use_scale_shift_norm=False, dropout 0)."""

    out_channels: int
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, emb):
        h = GroupNorm(self.norm_groups, 1e-5, name="in_layers_0")(x)
        h = Conv(self.out_channels, 3, dtype=self.dtype, conv_impl=self.conv_impl, name="in_layers_2")(nn.silu(h))
        e = Dense(self.out_channels, dtype=self.dtype, name="emb_layers_1")(nn.silu(emb))
        h = h + e[:, None, None, :].astype(h.dtype)
        h = GroupNorm(self.norm_groups, 1e-5, name="out_layers_0")(h)
        h = Conv(self.out_channels, 3, zero=True, dtype=self.dtype, conv_impl=self.conv_impl,
                 name="out_layers_3")(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, 1, dtype=self.dtype, name="skip_connection")(x)
        return x.astype(h.dtype) + h


class CrossAttention(nn.Module):
    """ldm CrossAttention: bias-free q/k/v, softmax(q k^T / sqrt(d_head)) v, output Linear.
    `attention` is jax.nn.dot_product_attention's implementation: None (XLA picks), "xla" or
    "cudnn" (fused flash attention on NVIDIA GPUs; float16/bfloat16 only)."""

    heads: int
    dim_head: int
    dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, x, context=None):
        context = x if context is None else context
        inner = self.heads * self.dim_head
        b, t, c = x.shape
        q = Dense(inner, use_bias=False, dtype=self.dtype, name="to_q")(x)
        k = Dense(inner, use_bias=False, dtype=self.dtype, name="to_k")(context)
        v = Dense(inner, use_bias=False, dtype=self.dtype, name="to_v")(context)
        split = lambda a: a.reshape(a.shape[0], a.shape[1], self.heads, self.dim_head)
        q, k, v = split(q), split(k), split(v)
        kv_lengths = None
        if self.attention == "cudnn" and k.shape[1] % 2:
            k, v, kv_lengths = even_keys(k, v)
        out = jax.nn.dot_product_attention(q, k, v, scale=self.dim_head ** -0.5, key_value_seq_lengths=kv_lengths,
                                           implementation=self.attention)
        return Dense(c, dtype=self.dtype, name="to_out_0")(out.reshape(b, t, inner))


def even_keys(k, v):
    """(k, v, lengths) with one zero key and value appended, masked out by the lengths: the same
    attention over an even number of keys. jax's cuDNN attention refuses an odd key length when it
    is differentiated (SD's 77 text tokens): its training check takes the empty placeholder it puts
    in for "no bias" for a bias (jax 0.10-0.11, jax/_src/cudnn/fused_attention_stablehlo.py)."""
    pad = ((0, 0), (0, 1), (0, 0), (0, 0))
    return jnp.pad(k, pad), jnp.pad(v, pad), jnp.full((k.shape[0],), k.shape[1], jnp.int32)


class GEGLU(nn.Module):
    inner: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = Dense(2 * self.inner, dtype=self.dtype, name="proj")(x)
        h, gate = jnp.split(h, 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        h = GEGLU(dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return Dense(dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    heads: int
    dim_head: int
    dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, x, context):
        attn = lambda name: CrossAttention(self.heads, self.dim_head, dtype=self.dtype, attention=self.attention,
                                           name=name)
        x = attn("attn1")(LayerNorm(name="norm1")(x)) + x
        x = attn("attn2")(LayerNorm(name="norm2")(x), context.astype(x.dtype)) + x
        x = FeedForward(dtype=self.dtype, name="ff")(LayerNorm(name="norm3")(x)) + x
        return x


class SpatialTransformer(nn.Module):
    """ldm SpatialTransformer with conv proj_in/proj_out (use_linear=False), as in SD v1.5."""

    heads: int
    depth: int = 1
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    attention: str | None = None

    @nn.compact
    def __call__(self, x, context):
        b, h, w, c = x.shape
        y = GroupNorm(self.norm_groups, 1e-6, name="norm")(x)
        y = Conv(c, 1, dtype=self.dtype, name="proj_in")(y)
        y = y.reshape(b, h * w, c)
        for d in range(self.depth):
            y = BasicTransformerBlock(self.heads, c // self.heads, dtype=self.dtype, attention=self.attention,
                                      name=f"transformer_blocks_{d}")(y, context)
        y = y.reshape(b, h, w, c)
        y = Conv(c, 1, zero=True, dtype=self.dtype, name="proj_out")(y)
        return y + x.astype(y.dtype)


def _convs_and_dots_saveable(prim, *args, **params) -> bool:
    """Keeps every convolution's output and the linear layers' (matmuls without batch dims)."""
    return prim is jax.lax.conv_general_dilated_p or \
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)


# The jax.checkpoint policy of each constants.REMAT_POLICIES name ("none": no rematerialisation).
REMAT_SAVES = {"blocks": jax.checkpoint_policies.nothing_saveable,
               "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
               "convs_and_dots": _convs_and_dots_saveable}


def remat_blocks(policy: str) -> tuple[type[nn.Module], type[nn.Module]]:
    """(ResBlock, SpatialTransformer), each rematerialised in the backward pass under `policy`
    (constants.REMAT_POLICIES; "none": the plain blocks)."""
    if policy == "none":
        return ResBlock, SpatialTransformer
    if policy not in REMAT_SAVES:
        raise ValueError(f"remat: unknown policy {policy!r}; choose one of none, {', '.join(REMAT_SAVES)}")
    return nn.remat(ResBlock, policy=REMAT_SAVES[policy]), nn.remat(SpatialTransformer, policy=REMAT_SAVES[policy])


class Downsample(nn.Module):
    """UNet downsample: 3x3 conv, stride 2, padding 1 (named `op` as in ldm)."""

    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        return Conv(x.shape[-1], 3, stride=2, padding=1, dtype=self.dtype, conv_impl=self.conv_impl, name="op")(x)


class Upsample(nn.Module):
    """UNet upsample: nearest x2 then a 3x3 conv (named `conv` as in ldm)."""

    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        return Conv(x.shape[-1], 3, dtype=self.dtype, conv_impl=self.conv_impl, name="conv")(upsample_nearest2x(x))
