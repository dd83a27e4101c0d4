"""The ldm <-> Flax name and layout rules, in one place, used by both conversion directions.

Our Flax modules are named after the ldm checkpoint names (see models/layers.py), so one rule maps
every parameter:

* ldm key -> Flax path: split on '.', glue each purely numeric part onto the part before it
  with '_' (`input_blocks.1.0.in_layers.2.weight` -> input_blocks_1_0 / in_layers_2 / kernel).
  The ldm autoencoder's mid block already uses underscores (`mid.block_1`, `mid.attn_1`,
  `mid.block_2`); they map to the same Flax names, and the reverse rule keeps them (the only
  exception: children of a `mid` module).
* leaf: `weight` of rank 4 -> `kernel` (OIHW -> HWIO), rank 2 -> `kernel` (transposed),
  rank 1 -> `scale` (GroupNorm/LayerNorm); `bias` -> `bias`.
  BatchNorm `running_mean` / `running_var` <-> `mean` / `var`.
* prefixes: `model.diffusion_model.` <-> unet, `control_model.` <-> sg, `first_stage_model.` <-> vae,
  `pretrained_model.` (the timm ResNet-50 a trained DiAD checkpoint carries) <-> resnet.
"""
from __future__ import annotations

import re

import numpy as np

PREFIXES: dict[str, str] = {
    "model.diffusion_model.": "unet",
    "control_model.": "sg",
    "first_stage_model.": "vae",
    "pretrained_model.": "resnet",
}
GROUP_TO_PREFIX = {v: k for k, v in PREFIXES.items()}

_BN_TO_FLAX = {"running_mean": "mean", "running_var": "var"}
_BN_TO_TORCH = {v: k for k, v in _BN_TO_FLAX.items()}
_KEEP_UNDERSCORE_UNDER = {"mid": {"block_1", "attn_1", "block_2"}}
_INDEXED = re.compile(r"^(.*?)((?:_\d+)+)$")


def ldm_to_flax_path(key: str) -> tuple[str, ...]:
    """`input_blocks.1.0.in_layers.2.weight` -> ('input_blocks_1_0', 'in_layers_2', 'weight').

    The leaf keeps its torch name; `convert_leaf` renames it."""
    parts: list[str] = []
    for p in key.split("."):
        if p.isdigit():
            if not parts:
                raise ValueError(f"key {key!r}: starts with an index")
            parts[-1] = f"{parts[-1]}_{p}"
        else:
            parts.append(p)
    return tuple(parts)


def flax_to_ldm_path(path: tuple[str, ...]) -> str:
    """Inverse of `ldm_to_flax_path` (module parts only; leaf names are handled separately)."""
    out: list[str] = []
    parent = None
    for p in path:
        if parent in _KEEP_UNDERSCORE_UNDER and p in _KEEP_UNDERSCORE_UNDER[parent]:
            out.append(p)
        else:
            m = _INDEXED.match(p)
            if m and m.group(1):
                out.append(m.group(1) + "." + ".".join(m.group(2)[1:].split("_")))
            else:
                out.append(p)
        parent = p
    return ".".join(out)


def torch_leaf_name(name: str, ndim: int) -> str:
    """Flax leaf name of the torch leaf `name` of rank `ndim`; ValueError for one no parameter has."""
    if name == "bias":
        return "bias"
    if name in _BN_TO_FLAX:
        return _BN_TO_FLAX[name]
    if name != "weight":
        raise ValueError(f"unknown parameter leaf {name!r}")
    if ndim in (2, 4):  # linear, conv
        return "kernel"
    if ndim == 1:  # norm weight
        return "scale"
    raise ValueError(f"weight of unsupported rank {ndim}")


def _oihw_to_hwio(array: np.ndarray) -> np.ndarray:
    """A contiguous HWIO copy of an OIHW kernel in two passes: the (O, I*H*W) matrix transposed,
    then (I, HW, O) -> (HW, I, O), whose inner rows of O stay contiguous. 3x faster than one strided
    copy (np.transpose + ascontiguousarray: 270 MB/s on a 1280x1280x3x3 kernel, here 850 MB/s)."""
    o, i, h, w = array.shape
    ihwo = np.ascontiguousarray(np.asarray(array).reshape(o, i * h * w).T)
    return np.ascontiguousarray(ihwo.reshape(i, h, w, o).transpose(1, 2, 0, 3))


def torch_leaf_to_flax(name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    """(torch leaf name, tensor) -> (flax leaf name, array in Flax layout)."""
    leaf = torch_leaf_name(name, array.ndim)
    if leaf == "kernel":  # conv OIHW -> HWIO, linear [out, in] -> [in, out]
        return leaf, _oihw_to_hwio(array) if array.ndim == 4 else np.transpose(array)
    return leaf, array


def flax_leaf_to_torch(name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    if name == "bias":
        return "bias", array
    if name == "scale":
        return "weight", array
    if name in _BN_TO_TORCH:
        return _BN_TO_TORCH[name], array
    if name == "kernel":
        if array.ndim == 4:
            return "weight", np.transpose(array, (3, 2, 0, 1))
        if array.ndim == 2:
            return "weight", np.transpose(array)
    raise ValueError(f"unsupported Flax leaf {name!r} of rank {np.ndim(array)}")


def flax_shape_to_torch(name: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    if name == "kernel" and len(shape) == 4:
        return "weight", (shape[3], shape[2], shape[0], shape[1])
    if name == "kernel" and len(shape) == 2:
        return "weight", (shape[1], shape[0])
    if name in _BN_TO_TORCH:
        return _BN_TO_TORCH[name], tuple(shape)
    return ("weight" if name == "scale" else name), tuple(shape)


def split_group(key: str) -> tuple[str, str] | None:
    """'control_model.x.y' -> ('sg', 'x.y'); None when the key has no known prefix."""
    for prefix, group in PREFIXES.items():
        if key.startswith(prefix):
            return group, key[len(prefix):]
    return None


def flax_key_to_ldm(group: str, path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """Full ldm key and torch shape of the Flax parameter at params[group][path...]."""
    leaf, tshape = flax_shape_to_torch(path[-1], shape)
    return f"{GROUP_TO_PREFIX[group]}{flax_to_ldm_path(path[:-1])}.{leaf}", tshape
