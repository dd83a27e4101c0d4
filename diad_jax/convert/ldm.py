"""Strict conversion between ldm-layout state dicts and our Flax params (both directions).

Every source key is either consumed, explicitly ignored (`IGNORED_PATTERNS`), or reported as
unexpected; every target parameter must be filled; every shape and dtype is checked. A mismatch
raises `ConversionError` listing all missing / unexpected / mis-shaped / non-float keys, unless the
caller passes allow-lists (which cover missing and unexpected keys only).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import jax
import numpy as np
from flax import traverse_util

from diad_jax.errors import UserError
from diad_jax.convert.keys import (
    GROUP_TO_PREFIX, flax_key_to_ldm, flax_leaf_to_torch, ldm_to_flax_path, split_group,
    torch_leaf_name, torch_leaf_to_flax,
)

# Keys a reference checkpoint carries that are not model parameters of the converted groups.
IGNORED_PATTERNS: tuple[str, ...] = (
    # ldm DDPM schedule buffers
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights", "logvar",
    # EMA copies (non-pruned SD checkpoints)
    "model_ema.*",
    # the CLIP text tower: consumed separately (run once to produce the context), never a param
    "cond_stage_model.*",
    # the timm ResNet-50 attached for validation: only layer1..layer3 are used for scoring
    "pretrained_model.layer4.*", "pretrained_model.fc.*", "*.num_batches_tracked",
    # autoencoder training losses (LPIPS, discriminator) in fine-tuned VAE checkpoints
    "first_stage_model.loss.*", "loss.*",
    # CLIP position ids buffer in some exports
    "*.position_ids",
)

# The dtypes a weight may be stored in (converted parameters are cast to float32, and the summary
# says how many were). Anything else, integers and booleans above all, is an encoding of weights
# (a quantised checkpoint), which a cast would turn into nonsense: refused.
FLOAT_DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")


def stored_dtype(t: Any) -> str:
    """A torch / numpy / jax tensor's dtype as stored, without torch's prefix: 'float16', 'int8', 'bool', ..."""
    return str(t.dtype).removeprefix("torch.")


class ConversionError(UserError):
    """A conversion that does not match its target exactly, or whose weights are not finite or not floats."""

    def __init__(self, source: str, missing=(), unexpected=(), mismatched=(), non_finite=(), not_float=(),
                 matched: int | None = None):
        self.source, self.matched = source, matched
        self.missing, self.unexpected, self.mismatched = sorted(missing), sorted(unexpected), sorted(mismatched)
        self.non_finite, self.not_float = sorted(non_finite), sorted(not_float)
        lines = [f"conversion of {source} failed:"]
        wrong = len(self.missing) + len(self.unexpected) + len(self.mismatched)
        if matched is not None and len(self.mismatched) >= 3 and wrong > matched:
            lines.append(f"  {wrong} keys disagree with the model and only {matched} match: the model config "
                         f"({{0}}) most likely does not fit this checkpoint (e.g. tiny vs sd15)")
        if self.non_finite:
            lines.append(f"  {len(self.non_finite)} tensor(s) hold NaN or inf ({{1}} converts them anyway):")
            lines += _by_prefix((k, k) for k in self.non_finite)
        if self.not_float:
            lines.append(f"  {len(self.not_float)} tensor(s) are not {'/'.join(FLOAT_DTYPES)} (key: dtype): integer "
                         f"or boolean weights are a quantised or otherwise encoded checkpoint, which a cast to float "
                         f"would turn into nonsense; convert the source to floating point first:")
            lines += _by_prefix((k, f"{k}: {d}") for k, d in self.not_float)
        if self.missing:
            lines.append(f"  {len(self.missing)} missing key(s) (expected by the model, absent from the source):")
            lines += _by_prefix((k, k) for k in self.missing)
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} unexpected key(s) (in the source, not used by the model):")
            lines += _by_prefix((k, k) for k in self.unexpected)
        if self.mismatched:
            lines.append(f"  {len(self.mismatched)} key(s) with the wrong shape (key: source vs expected):")
            lines += _by_prefix((k, f"{k}: {tuple(a)} vs {tuple(b)}") for k, a, b in self.mismatched)
        if wrong:
            lines.append("  ({2} / {3} PATTERN accept known differences)")
        super().__init__("\n".join(lines), fields=["config", "allow_non_finite=True", "allow_missing", "allow_unexpected"])

    def merged(self, other: ConversionError) -> ConversionError:
        """One error listing this one's findings and `other`'s, which another reader found in the same
        source (the CLIP tower's, beside the key report)."""
        return ConversionError(self.source, self.missing + other.missing, self.unexpected + other.unexpected,
                               self.mismatched + other.mismatched, self.non_finite + other.non_finite,
                               self.not_float + other.not_float, matched=self.matched)


def _by_prefix(entries: Iterable[tuple[str, str]]) -> list[str]:
    """Message lines of (key, line) entries sorted by key: grouped under their prefix
    (`control_model.*`, ...) with the count of each, so that hundreds stay readable; every entry
    is listed. Keys without a prefix come first, on their own."""
    groups: dict[str, list[str]] = {}
    for key, line in entries:
        sg = split_group(key)
        prefix = GROUP_TO_PREFIX[sg[0]] if sg else key[:key.index(".") + 1] if "." in key else ""
        groups.setdefault(prefix, []).append(line)
    lines = []
    for prefix, group in sorted(groups.items()):
        if prefix:
            lines.append(f"    {prefix}* ({len(group)}):")
        lines += [("      " if prefix else "    ") + line for line in group]
    return lines


@dataclass
class ConversionReport:
    consumed: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    allowed_missing: list[str] = field(default_factory=list)
    allowed_unexpected: list[str] = field(default_factory=list)
    dtype: str = "float32"  # of the converted parameters
    cast: dict[str, int] = field(default_factory=dict)  # stored dtype -> number of tensors cast from it to `dtype`


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def to_numpy(t: Any) -> np.ndarray:
    """torch tensor / numpy / jax array -> float32-or-native numpy array (bf16/fp16 -> fp32)."""
    if hasattr(t, "detach"):  # torch
        t = t.detach().cpu()
        if str(t.dtype) in ("torch.bfloat16", "torch.float16"):
            t = t.float()
        return t.numpy()
    a = np.asarray(t)
    if a.dtype.kind == "f" and a.dtype != np.float32 and a.dtype != np.float64:
        a = a.astype(np.float32)
    return a


def expected_ldm_keys(abstract: Mapping[str, Any], groups: Iterable[str] | None = None) -> dict[str, tuple]:
    """ldm key -> torch shape for every parameter of `abstract` (params or ShapeDtypeStructs)."""
    out = {}
    for group, tree in abstract.items():
        if groups is not None and group not in groups:
            continue
        for path, leaf in traverse_util.flatten_dict(tree).items():
            key, shape = flax_key_to_ldm(group, path, tuple(leaf.shape))
            out[key] = shape
    return out


def ldm_to_params(state_dict: Mapping[str, Any], abstract: Mapping[str, Any], *,
                  groups: Iterable[str] | None = None, source: str = "state dict",
                  allow_missing: Iterable[str] = (), allow_unexpected: Iterable[str] = (),
                  ignore: Iterable[str] = IGNORED_PATTERNS, dtype=np.float32,
                  consume: bool = False, as_jax: bool = True, allow_non_finite: bool = False,
                  ) -> tuple[dict, ConversionReport]:
    """Convert an ldm state dict to Flax params shaped like `abstract` (restricted to `groups`).

    Keys of groups not requested (e.g. `first_stage_model.` when converting only the UNet) are
    reported as unexpected unless they match `ignore` or `allow_unexpected`.

    Memory: each converted leaf becomes a host (CPU) `jax.Array` right away (orbax saves those
    without another copy), and with `consume=True` every source tensor is removed from
    `state_dict` once handled, so an SD-size conversion holds about one copy of the weights.

    A tensor holding NaN or inf is an error unless `allow_non_finite`; one that becomes a parameter
    must be stored in one of `FLOAT_DTYPES` (integer and boolean tensors are refused, each named
    with its dtype), and those not stored in `dtype` are counted in `report.cast`."""
    groups = tuple(abstract) if groups is None else tuple(groups)
    allow_missing, allow_unexpected, ignore = tuple(allow_missing), tuple(allow_unexpected), tuple(ignore)
    expected = {g: traverse_util.flatten_dict(abstract[g]) for g in groups}
    report = ConversionReport(dtype=np.dtype(dtype).name)
    filled: dict[str, dict] = {g: {} for g in groups}
    unexpected, mismatched, non_finite, not_float = [], [], [], []
    cpu = jax.devices("cpu")[0] if as_jax else None
    for key in list(state_dict.keys()):
        value = state_dict.pop(key) if consume else state_dict[key]
        sg = split_group(key)
        if sg is None or sg[0] not in groups:
            if _matches(key, ignore):
                report.ignored.append(key)
            elif _matches(key, allow_unexpected):
                report.allowed_unexpected.append(key)
            else:
                unexpected.append(key)
            continue
        group, rest = sg
        if _matches(key, ignore):
            report.ignored.append(key)
            continue
        try:
            path = ldm_to_flax_path(rest)
            fpath = path[:-1] + (torch_leaf_name(path[-1], len(value.shape)),)
        except ValueError:
            (report.allowed_unexpected if _matches(key, allow_unexpected) else unexpected).append(key)
            continue
        target = expected[group].get(fpath)
        if target is None:
            (report.allowed_unexpected if _matches(key, allow_unexpected) else unexpected).append(key)
            continue
        _, tshape = flax_key_to_ldm(group, fpath, tuple(target.shape))
        if tuple(value.shape) != tshape:
            mismatched.append((key, tuple(value.shape), tshape))
            filled[group][fpath] = None  # present, wrong shape: reported once, not also as missing
            continue
        stored = stored_dtype(value)
        if stored not in FLOAT_DTYPES:  # checked before any conversion: torch cannot give numpy a qint8 or float8
            not_float.append((key, stored))
            filled[group][fpath] = None  # present, not float: likewise
            continue
        _, arr_f = torch_leaf_to_flax(path[-1], to_numpy(value))
        out = np.ascontiguousarray(arr_f, dtype=dtype)
        if not allow_non_finite and not np.isfinite(out).all():
            non_finite.append(key)
        filled[group][fpath] = jax.device_put(out, cpu) if as_jax else out
        del value, arr_f, out
        if stored != report.dtype:
            report.cast[stored] = report.cast.get(stored, 0) + 1
        report.consumed.append(key)
    missing = []
    for g in groups:
        for fpath, leaf in expected[g].items():
            if fpath not in filled[g]:
                key, _ = flax_key_to_ldm(g, fpath, tuple(leaf.shape))
                if _matches(key, allow_missing):
                    report.allowed_missing.append(key)
                    filled[g][fpath] = np.zeros(leaf.shape, dtype)
                else:
                    missing.append(key)
    if missing or unexpected or mismatched or non_finite or not_float:
        raise ConversionError(source, missing, unexpected, mismatched, non_finite, not_float,
                              matched=len(report.consumed))
    params = {g: traverse_util.unflatten_dict(filled[g]) for g in groups}
    return params, report


def params_to_ldm(params: Mapping[str, Any], groups: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Flax params -> ldm state dict of numpy arrays (torch layout)."""
    out = {}
    for group, tree in params.items():
        if groups is not None and group not in groups:
            continue
        if group not in GROUP_TO_PREFIX:
            continue
        for path, leaf in traverse_util.flatten_dict(tree).items():
            key, _ = flax_key_to_ldm(group, path, tuple(np.shape(leaf)))
            _, arr = flax_leaf_to_torch(path[-1], np.asarray(leaf))
            out[key] = np.ascontiguousarray(arr)
    return out
