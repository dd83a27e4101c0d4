"""Fast host-side parameter initialisation with the reference's rules.

`jax.jit(module.init)` compiles the whole forward pass plus one RNG stream per parameter, which
takes seconds even for the tiny config and minutes at SD size. Since every initialiser in this
model is one of a few PyTorch defaults, the params are filled on the host with NumPy from the
abstract tree instead (well under a second for the tiny config):

* kernels and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch Conv/Linear defaults);
* norm scales 1, norm biases 0;
* zero: the layers ldm wraps in `zero_module` (ResBlock out_layers.3, the transformer proj_out
  in the UNet and the SG network, the UNet's out.2), and DiAD's new SG layers (zero convs,
  middle_block_out, the last hint conv, the SFF convs).

The Flax modules carry the same rules as initialisers (`zero=True`); a test checks that both
give the same zero pattern and bounds.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

_ZERO_EVERYWHERE = re.compile(r"^(zero_convs_\d+_\d+|middle_block_out_\d+|down\d\d_\d+)$")
_ZERO_IN_DENOISER = {"out_layers_3", "proj_out"}


def _is_zero_layer(group: str, path: tuple[str, ...], last_hint: str | None) -> bool:
    modules = path[:-1]
    if any(_ZERO_EVERYWHERE.match(m) for m in modules):
        return True
    if group in ("unet", "sg") and modules and modules[-1] in _ZERO_IN_DENOISER:
        return True
    if group == "unet" and modules == ("out_2",):
        return True
    if group == "sg" and modules and modules[0] == last_hint:
        return True
    return False


def _last_hint_block(names) -> str | None:
    idx = [int(n.rsplit("_", 1)[1]) for n in names if n.startswith("input_hint_block_")]
    return f"input_hint_block_{max(idx)}" if idx else None


def init_params(abstract: Mapping[str, Any], seed: int = 0) -> dict:
    """NumPy float32 params shaped like `abstract` ({group: tree}), reference initialisation."""
    rng = np.random.default_rng(seed)
    out = {}
    for group in sorted(abstract):
        flat = traverse_util.flatten_dict(abstract[group])
        last_hint = _last_hint_block({p[0] for p in flat})
        filled = {}
        for path in sorted(flat):
            shape = tuple(flat[path].shape)
            leaf = path[-1]
            sibling_kernel = flat.get(path[:-1] + ("kernel",))
            if leaf in ("scale", "var"):  # norm scales; BatchNorm running variance
                filled[path] = np.ones(shape, np.float32)
            elif leaf == "mean":  # BatchNorm running mean
                filled[path] = np.zeros(shape, np.float32)
            elif leaf == "bias" and sibling_kernel is None:  # a norm's bias
                filled[path] = np.zeros(shape, np.float32)
            elif _is_zero_layer(group, path, last_hint):
                filled[path] = np.zeros(shape, np.float32)
            else:
                kshape = shape if leaf == "kernel" else tuple(sibling_kernel.shape)
                fan_in = int(np.prod(kshape[:-1]))
                bound = 1.0 / np.sqrt(fan_in)
                filled[path] = rng.uniform(-bound, bound, shape).astype(np.float32)
        out[group] = traverse_util.unflatten_dict(filled)
    return out
