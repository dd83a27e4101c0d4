"""Strict conversion between ldm-layout state dicts and our Flax params (both directions).

Every source key is either consumed, explicitly ignored (`IGNORED_PATTERNS`), or reported as
unexpected; every target parameter must be filled; every shape is checked. A mismatch raises
`ConversionError` listing all missing / unexpected / mis-shaped keys, unless the caller passes
allow-lists.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import jax
import numpy as np
from flax import traverse_util

from diad_jax.errors import UserError
from diad_jax.convert.keys import (
    GROUP_TO_PREFIX, flax_key_to_ldm, flax_leaf_to_torch, ldm_to_flax_path, split_group,
    torch_leaf_to_flax,
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


class ConversionError(UserError):
    """A conversion that does not match its target exactly, or whose weights are not finite."""

    def __init__(self, source: str, missing=(), unexpected=(), mismatched=(), non_finite=(),
                 matched: int | None = None):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        self.non_finite = list(non_finite)
        lines = [f"conversion of {source} failed:"]
        wrong = len(self.missing) + len(self.unexpected) + len(self.mismatched)
        if matched is not None and len(self.mismatched) >= 3 and wrong > matched:
            lines.append(f"  {wrong} keys disagree with the model and only {matched} match: the model config "
                         f"(--config) most likely does not fit this checkpoint (e.g. tiny vs sd15)")
        if self.non_finite:
            lines.append(f"  {len(self.non_finite)} tensor(s) hold NaN or inf (pass --allow-non-finite, "
                         f"allow_non_finite=True in Python, to convert them anyway):")
            lines += [f"    {k}" for k in self.non_finite]
        if self.missing:
            lines.append(f"  {len(self.missing)} missing key(s) (expected by the model, absent from the source):")
            lines += [f"    {k}" for k in self.missing]
        if self.unexpected:
            lines.append(f"  {len(self.unexpected)} unexpected key(s) (in the source, not used by the model):")
            lines += [f"    {k}" for k in self.unexpected]
        if self.mismatched:
            lines.append(f"  {len(self.mismatched)} key(s) with the wrong shape (key: source vs expected):")
            lines += [f"    {k}: {tuple(a)} vs {tuple(b)}" for k, a, b in self.mismatched]
        if wrong:
            lines.append("  (pass --allow-missing / --allow-unexpected PATTERN, or allow_missing= / allow_unexpected= "
                         "in Python, to accept known differences)")
        super().__init__("\n".join(lines))


@dataclass
class ConversionReport:
    consumed: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    allowed_missing: list[str] = field(default_factory=list)
    allowed_unexpected: list[str] = field(default_factory=list)


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

    A tensor holding NaN or inf is an error unless `allow_non_finite`."""
    groups = tuple(abstract) if groups is None else tuple(groups)
    allow_missing, allow_unexpected, ignore = tuple(allow_missing), tuple(allow_unexpected), tuple(ignore)
    expected = {g: traverse_util.flatten_dict(abstract[g]) for g in groups}
    report = ConversionReport()
    filled: dict[str, dict] = {g: {} for g in groups}
    unexpected, mismatched, non_finite = [], [], []
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
        except ValueError:
            unexpected.append(key)
            continue
        arr = to_numpy(value)
        try:
            leaf, arr_f = torch_leaf_to_flax(path[-1], arr)
        except ValueError:
            (report.allowed_unexpected if _matches(key, allow_unexpected) else unexpected).append(key)
            continue
        fpath = path[:-1] + (leaf,)
        target = expected[group].get(fpath)
        if target is None:
            (report.allowed_unexpected if _matches(key, allow_unexpected) else unexpected).append(key)
            continue
        if tuple(arr_f.shape) != tuple(target.shape):
            _, tshape = flax_key_to_ldm(group, fpath, tuple(target.shape))
            mismatched.append((key, tuple(arr.shape), tshape))
            filled[group][fpath] = None  # present, wrong shape: reported once, not also as missing
            continue
        out = np.ascontiguousarray(arr_f, dtype=dtype)
        if not allow_non_finite and not np.isfinite(out).all():
            non_finite.append(key)
        filled[group][fpath] = jax.device_put(out, cpu) if as_jax else out
        del value, arr, arr_f, out
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
    if missing or unexpected or mismatched or non_finite:
        raise ConversionError(source, sorted(missing), sorted(unexpected), sorted(mismatched), sorted(non_finite),
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
