"""Reference checkpoints -> one diad_jax model checkpoint (the logic behind convert/*.py).

Three sources, as users arrive with them:
* a trained DiAD state dict (`control_model.`, `model.diffusion_model.`, `first_stage_model.`,
  `cond_stage_model.`, usually `pretrained_model.` too): `convert_diad`;
* SD v1.5 + a fine-tuned autoencoder, to start training: `convert_start_of_training` (the SG
  network is initialised from the SD encoder by name as the reference's build_model.py does);
* a timm/torchvision ResNet-50 state dict: `convert_resnet`.
The text context is the CLIP text tower's output for the empty prompt, computed once here
(`clip_context`), since DiAD's prompt is always "".
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flax.core import meta

from diad_jax.configs import ModelConfig
from diad_jax.convert.ldm import (
    FLOAT_DTYPES, IGNORED_PATTERNS, ConversionError, ConversionReport, ldm_to_params, stored_dtype, to_numpy,
)
from diad_jax.convert.torch_io import CheckpointReadError
from diad_jax.errors import ConfigError
from diad_jax.models.diad import DiAD, copy_unet_into_sg
from diad_jax.models.init import init_params
from diad_jax.models.resnet import resnet_abstract_params

log = logging.getLogger(__name__)

CLIP_PREFIX = "cond_stage_model.transformer."
BOS, EOS = 49406, 49407  # CLIP's <|startoftext|>, <|endoftext|> (also the padding token in SD)


@dataclass
class Converted:
    config: ModelConfig
    params: dict
    context: np.ndarray | None
    resnet: dict | None = None
    reports: dict[str, ConversionReport] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ---- CLIP text context --------------------------------------------------------------------------
def empty_prompt_ids(max_length: int = 77) -> list[int]:
    """Token ids of "" as FrozenCLIPEmbedder produces them: BOS, then EOS padded to max_length."""
    return [BOS] + [EOS] * (max_length - 1)


def clip_context(state_dict: Mapping[str, Any], prefix: str = CLIP_PREFIX, source: str = "checkpoint",
                 num_heads: int | None = None) -> np.ndarray:
    """Run the CLIP text tower stored under `prefix` on the empty prompt -> (1, 77, D) float32.

    The architecture is read off the weights (vocab, width, depth, MLP width, positions); heads =
    width / 64 as in every OpenAI CLIP text tower unless `num_heads` is given. Its weights must be
    floats (`FLOAT_DTYPES`), like every converted parameter; the integer `position_ids` buffer
    some exports carry is not one of them."""
    try:
        import torch
        from transformers import CLIPTextConfig, CLIPTextModel
    except ImportError as e:
        raise CheckpointReadError(f"{source}: computing the text context with its CLIP text tower needs torch and "
                                  f"transformers: pip install 'diad-jax[convert]' (or pass a precomputed (1, 77, 768) "
                                  f"context: {{0}})", fields=["prompt_context"]) from e

    # ldm checkpoints carry transformers-4 names (`text_model.embeddings...`); normalise to that.
    sd, not_float = {}, []
    for k, v in state_dict.items():
        if k.startswith(prefix) and not k.endswith("position_ids"):
            name = k[len(prefix):]
            sd[name if name.startswith("text_model.") else "text_model." + name] = v
            if (dtype := stored_dtype(v)) not in FLOAT_DTYPES:
                not_float.append((k, dtype))
    if not sd:
        raise ConversionError(source, missing=[f"{prefix}* (the whole CLIP text tower, which computes the text "
                                               f"context; or pass a precomputed context: prompt_context)"])
    need = ["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
            "text_model.encoder.layers.0.mlp.fc1.weight"]
    missing = [prefix + k for k in need if k not in sd]
    if missing or not_float:
        raise ConversionError(source, missing=missing, not_float=not_float)
    vocab, hidden = tuple(sd[need[0]].shape)
    positions = int(sd[need[1]].shape[0])
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k)))
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(sd[need[2]].shape[0]),
        num_hidden_layers=layers, num_attention_heads=num_heads or max(1, hidden // 64),
        max_position_embeddings=positions, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
    model = CLIPTextModel(config).eval()
    # transformers 5 names the same parameters without the `text_model.` level
    strip = not any(k.startswith("text_model.") for k in model.state_dict())
    to_model = (lambda k: k[len("text_model."):]) if strip else (lambda k: k)
    tensors = {to_model(k): v.float() if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v, np.float32))
               for k, v in sd.items()}
    result = model.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        back = (lambda k: "text_model." + k) if strip else (lambda k: k)
        raise ConversionError(source, missing=[prefix + back(k) for k in result.missing_keys],
                              unexpected=[prefix + back(k) for k in result.unexpected_keys])
    ids = torch.tensor([empty_prompt_ids(positions)])
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
    return out.float().numpy()


def load_prompt_context(path, config: ModelConfig, allow_non_finite: bool = False) -> np.ndarray:
    try:
        ctx = np.load(path)
    except (OSError, ValueError) as e:
        raise CheckpointReadError(f"{{0}} {path}: not a readable .npy file ({e})", fields=["prompt_context"]) from e
    ctx = ctx[None] if ctx.ndim == 2 else ctx
    return _check_context(ctx.astype(np.float32), config, f"the prompt context {path}", allow_non_finite)


def _check_context(ctx: np.ndarray, config: ModelConfig, source: str, allow_non_finite: bool) -> np.ndarray:
    expected = (1, config.context_len, config.unet.context_dim)
    if ctx.shape != expected:
        raise ConfigError(f"{source}: prompt context has shape {ctx.shape}, expected {expected} (context_len, "
                          f"unet.context_dim of the model config)")
    if not allow_non_finite and not np.isfinite(ctx).all():
        raise ConversionError(source, non_finite=["text context"])
    return ctx


# ---- the conversions ------------------------------------------------------------------------------
def _with_context(state_dict: Mapping[str, Any], prompt_context: np.ndarray | None, source: str,
                  convert: Callable[[], Any]) -> tuple[Any, np.ndarray]:
    """(`convert()`, the text context): the CLIP tower of `state_dict` runs first (`convert` may
    consume its weights) unless `prompt_context` is given. What both find wrong with the source is
    raised as one error, so that it lists everything at once."""
    clip_error = None
    if prompt_context is not None:
        context = prompt_context
    else:
        try:
            context = clip_context(state_dict, source=source)
        except ConversionError as e:
            clip_error, context = e, None
    try:
        result = convert()
    except ConversionError as e:
        raise (e if clip_error is None else e.merged(clip_error)) from None
    if clip_error is not None:
        raise clip_error
    return result, context


def convert_resnet(state_dict: Mapping[str, Any], source: str = "ResNet-50 state dict",
                   allow_missing: Iterable[str] = (), allow_unexpected: Iterable[str] = (),
                   allow_non_finite: bool = False):
    """timm / torchvision ResNet-50 (with or without the `pretrained_model.` prefix) -> params."""
    prefixed = state_dict if any(k.startswith("pretrained_model.") for k in state_dict) else \
        _Prefixed(state_dict, "pretrained_model.")
    params, report = ldm_to_params(prefixed, {"resnet": resnet_abstract_params()}, groups=("resnet",),
                                   source=source, allow_missing=allow_missing,
                                   allow_unexpected=allow_unexpected, allow_non_finite=allow_non_finite)
    return params["resnet"], report


class _Prefixed(Mapping):
    def __init__(self, inner: Mapping, prefix: str):
        self.inner, self.prefix = inner, prefix

    def __getitem__(self, k):
        return self.inner[k[len(self.prefix):]]

    def __iter__(self):
        return (self.prefix + k for k in self.inner)

    def __len__(self):
        return len(self.inner)

    def pop(self, k):
        return self.inner.pop(k[len(self.prefix):])


def convert_diad(state_dict: Mapping[str, Any], config: ModelConfig, *, source: str = "DiAD checkpoint",
                 prompt_context: np.ndarray | None = None, allow_missing: Iterable[str] = (),
                 allow_unexpected: Iterable[str] = (), allow_non_finite: bool = False,
                 consume: bool = False) -> Converted:
    """A trained DiAD state dict -> params (+ the ResNet when the checkpoint carries it).
    `consume=True` empties `state_dict` as it converts (lower peak memory)."""
    note = ("text context: the given prompt_context" if prompt_context is not None else
            "text context: CLIP text tower (cond_stage_model) on the empty prompt")
    abstract = DiAD(config).abstract_params()
    has_resnet = any(k.startswith("pretrained_model.") for k in state_dict)
    groups = ("unet", "sg", "vae") + (("resnet",) if has_resnet else ())
    if has_resnet:
        abstract = dict(abstract, resnet=resnet_abstract_params())
    (params, report), context = _with_context(
        state_dict, prompt_context, source,
        lambda: ldm_to_params(state_dict, abstract, groups=groups, source=source, consume=consume,
                              allow_missing=allow_missing, allow_unexpected=allow_unexpected,
                              allow_non_finite=allow_non_finite))
    resnet = params.pop("resnet", None)
    context = _check_context(context, config, source, allow_non_finite)  # after the key report, which says more
    return Converted(config, params, context, resnet, {"diad": report}, [note])


def convert_start_of_training(sd_state_dict: Mapping[str, Any], vae_state_dict: Mapping[str, Any] | None,
                              config: ModelConfig, *, seed: int = 0, sd_source: str = "SD checkpoint",
                              vae_source: str = "VAE checkpoint", prompt_context: np.ndarray | None = None,
                              allow_missing: Iterable[str] = (), allow_unexpected: Iterable[str] = (),
                              allow_non_finite: bool = False, consume: bool = False) -> Converted:
    """SD v1.5 (UNet, CLIP, and its VAE unless a fine-tuned one is given) -> initial DiAD params.

    The SG network copies the SD encoder, middle block and time embedding by name; its new layers
    get the reference's init (hint convs PyTorch-default, last hint conv, zero convs and SFF zero)."""
    ctx_note = ("text context: the given prompt_context" if prompt_context is not None else
                "text context: CLIP text tower of the SD checkpoint on the empty prompt")
    boxed = DiAD(config).abstract_params(boxed=True)  # zero-initialised layers marked, for init_params
    abstract = meta.unbox(boxed)
    notes = []
    ignore = IGNORED_PATTERNS
    groups = ("unet",) if vae_state_dict is not None else ("unet", "vae")
    if vae_state_dict is not None:
        ignore = ignore + ("first_stage_model.*",)
        notes.append(f"VAE: from {vae_source} (the SD checkpoint's first_stage_model.* is ignored)")
    else:
        notes.append(f"VAE: from {sd_source} (no fine-tuned autoencoder given)")
    (params, sd_report), context = _with_context(
        sd_state_dict, prompt_context, sd_source,
        lambda: ldm_to_params(sd_state_dict, abstract, groups=groups, source=sd_source, ignore=ignore,
                              allow_missing=allow_missing, allow_unexpected=allow_unexpected,
                              allow_non_finite=allow_non_finite, consume=consume))
    reports = {"sd": sd_report}
    if vae_state_dict is not None:
        prefixed = vae_state_dict if any(k.startswith("first_stage_model.") for k in vae_state_dict) else \
            _Prefixed(vae_state_dict, "first_stage_model.")
        vae, reports["vae"] = ldm_to_params(prefixed, abstract, groups=("vae",), source=vae_source,
                                            allow_missing=allow_missing, allow_unexpected=allow_unexpected,
                                            allow_non_finite=allow_non_finite, consume=consume)
        params["vae"] = vae["vae"]
    fresh = init_params({"sg": boxed["sg"]}, seed)
    params = copy_unet_into_sg({**params, "sg": fresh["sg"]})
    n_copied = _count_shared(params["unet"], params["sg"])
    notes.append(f"SG network: {n_copied} tensors copied from the SD UNet encoder/middle; the hint block, "
                 f"zero convs and SFF initialised as the reference does (zero where it uses zero_module)")
    notes.append(ctx_note)
    context = _check_context(context, config, sd_source, allow_non_finite)
    return Converted(config, params, context, None, reports, notes)


def _count_shared(unet: dict, sg: dict) -> int:
    from flax import traverse_util
    u, s = traverse_util.flatten_dict(unet), traverse_util.flatten_dict(sg)
    return sum(1 for k in s if k in u and u[k] is s[k])


# ---- summary --------------------------------------------------------------------------------------
def summarize(conv: Converted) -> str:
    import jax
    rows = []
    groups = dict(conv.params)
    if conv.resnet is not None:
        groups["resnet"] = conv.resnet
    total_n = total_b = 0
    for g, tree in groups.items():
        leaves = jax.tree.leaves(tree)
        n = sum(int(np.prod(np.shape(x))) for x in leaves)
        b = sum(int(np.prod(np.shape(x))) * np.asarray(x).dtype.itemsize for x in leaves)
        dtypes = sorted({str(np.asarray(x).dtype) for x in leaves})
        rows.append(f"  {g:<7} {len(leaves):>6} tensors {n / 1e6:>10.2f} M params  {'/'.join(dtypes):<8} "
                    f"{b / 2**20:>10.1f} MiB")
        total_n += n
        total_b += b
    rows.append(f"  {'total':<7} {'':>6}         {total_n / 1e6:>10.2f} M params  {'':<8} {total_b / 2**20:>10.1f} MiB")
    if conv.context is not None:
        rows.append(f"  context {tuple(conv.context.shape)} float32")
    for name, rep in conv.reports.items():
        rows.append(f"  [{name}] consumed {len(rep.consumed)} keys, ignored {len(rep.ignored)} "
                    f"(schedule buffers, EMA, CLIP, ...), allowed-missing {len(rep.allowed_missing)}, "
                    f"allowed-unexpected {len(rep.allowed_unexpected)}")
        if rep.cast:
            rows.append(f"  [{name}] cast to {rep.dtype}: " + ", ".join(
                f"{n} {d} tensor{'s' * (n != 1)}" for d, n in sorted(rep.cast.items())))
    rows += [f"  note: {n}" for n in conv.notes]
    return "\n".join(rows)


def numpy_tree(tree):
    import jax
    return jax.tree.map(lambda x: np.asarray(to_numpy(x)), tree)
