"""Fast host-side parameter initialisation with the reference's rules.

`jax.jit(module.init)` compiles the whole forward pass plus one RNG stream per parameter, which
takes seconds even for the tiny config and minutes at SD size. Since every initialiser in this
model is one of a few PyTorch defaults, the params are filled on the host with NumPy from the
abstract tree instead (well under a second for the tiny config):

* kernels and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch Conv/Linear defaults);
* norm scales 1, norm biases 0;
* zero: the layers the modules declare zero-initialised (`zero=True`): those ldm wraps in
  `zero_module` (ResBlock out_layers.3, the transformer proj_out, the UNet's out.2) and DiAD's new
  SG layers (zero convs, middle_block_out, the last hint conv, the SFF convs). The abstract tree
  carries their params boxed in `ZeroInit` (`jax.eval_shape` of the Flax init:
  `DiAD.abstract_params(boxed=True)`); no layer name decides it here.

A test checks that this and the Flax modules' own initialisers give the same zero pattern and bounds.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import traverse_util
from flax.core import meta

from diad_jax.models.layers import ZeroInit


def traced_once(abstract_params: Callable) -> Callable:
    """Caches a function of hashable arguments that returns abstract params (`jax.eval_shape` of a
    Flax init: seconds to trace, 4.6 s for DiAD at SD size on a CPU, and loading, training and
    converting each ask for it); every call gets a tree of its own (the leaves are immutable)."""
    cached = functools.lru_cache(maxsize=8)(abstract_params)

    @functools.wraps(abstract_params)
    def copy(*args, **kwargs):
        return jax.tree.map(lambda x: x, cached(*args, **kwargs))
    return copy


def init_params(abstract: Mapping[str, Any], seed: int = 0) -> dict:
    """NumPy float32 params shaped like `abstract` ({group: tree} of ShapeDtypeStructs, those of
    zero-initialised layers boxed in `ZeroInit`), reference initialisation. The zeros come from the
    boxes alone: pass `DiAD.abstract_params(boxed=True)`, not the unboxed tree."""
    rng = np.random.default_rng(seed)
    out = {}
    for group in sorted(abstract):
        flat = traverse_util.flatten_dict(abstract[group])
        filled = {}
        for path in sorted(flat):
            shape = tuple(meta.unbox(flat[path]).shape)
            leaf = path[-1]
            sibling_kernel = flat.get(path[:-1] + ("kernel",))
            if leaf in ("scale", "var"):  # norm scales; BatchNorm running variance
                filled[path] = np.ones(shape, np.float32)
            elif leaf == "mean":  # BatchNorm running mean
                filled[path] = np.zeros(shape, np.float32)
            elif leaf == "bias" and sibling_kernel is None:  # a norm's bias
                filled[path] = np.zeros(shape, np.float32)
            elif isinstance(flat[path], ZeroInit):
                filled[path] = np.zeros(shape, np.float32)
            else:
                kshape = shape if leaf == "kernel" else tuple(meta.unbox(sibling_kernel).shape)
                fan_in = int(np.prod(kshape[:-1]))
                bound = 1.0 / np.sqrt(fan_in)
                filled[path] = rng.uniform(-bound, bound, shape).astype(np.float32)
        out[group] = traverse_util.unflatten_dict(filled)
    return out
