"""The flags of the programs and how they become configs. Every flag that sets a config field has
the field's dotted path as its argparse dest (so the command's `Parser` names fields by their flags),
and defaults to "not given" (argparse.SUPPRESS), so only what is typed overrides the preset and the
--config file. The EvalConfig flags are generated from its fields, one rule for both programs:
`--<field>` in evaluate/predict/export, `--eval-<field>` in training."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import typing
from pathlib import Path

from diad_jax.cli.boundary import Parser
from diad_jax.configs import (LR_SCHEDULES, NO_WEIGHTS_COMPARATOR, REMAT_OF_BOOL, REMAT_POLICIES, EvalConfig,
                              TrainConfig, set_path, unflatten_train_dict)
from diad_jax.errors import ConfigError

S = argparse.SUPPRESS

# the training flags that are not TrainConfig fields (each of the others has its field's dotted path as its dest)
RUNTIME_FLAGS = {"preset", "config", "print_config", "no_progress", "distributed", "coordinator", "num_processes",
                 "process_id", "timeout", "compilation_cache", "overwrite", "options"}


def boolean(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def remat_policy(s: str) -> str:
    """--remat's value: a REMAT_POLICIES name, or true/false as before policies (on = 'blocks')."""
    if s in REMAT_POLICIES:
        return s
    try:
        return REMAT_OF_BOOL[boolean(s)]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(REMAT_POLICIES)}, got {s!r}") from None


def _number(kind, minimum, strict: bool):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum}, got {text}")
        return value
    return parse


positive_int = _number(int, 0, strict=True)
nonnegative_int = _number(int, 0, strict=False)
positive_float = _number(float, 0.0, strict=True)


def _step_range(text: str) -> tuple[int, int]:
    first, sep, last = text.partition(":")
    try:
        a, b = int(first), int(last)
    except ValueError:
        a = b = None
    if not sep or a is None or not 0 <= a < b:
        raise argparse.ArgumentTypeError(f"expected FIRST:LAST with 0 <= FIRST < LAST, got {text!r}")
    return a, b


# ---- EvalConfig flags, generated from its fields ---------------------------------------------------

EVAL_HELP = {
    "method": "reconstruction (the reference: denoise, then compare with the input) or inversion (InvAD: DDIM-invert "
              "the clean latent to noise and score how unlikely it is; no comparator, no ImageNet weights)",
    "schedule": "official: noise to t=999 then DDIM 901..1 as the reference; consistent: noise to 901",
    "ddim_steps": "DDIM steps (default 10)",
    "eta": "DDIM eta (default 0)",
    "guidance_scale": "classifier-free guidance scale (default 9)",
    "start_t": "noise the latent to this timestep and start the DDIM steps there (with schedule consistent; any "
               "number of DDIM steps up to it; default: the schedule's, 999 / 901)",
    "one_step": "reconstruct from ONE eps evaluation at the start timestep (its DDIM pred_x0; 1 DDIM step)",
    "comparator": "what compares input and reconstruction: resnet (the reference, needs ImageNet weights), "
                  f"pixel_l1, ssim or vae (no weights needed; {NO_WEIGHTS_COMPARATOR} measured best on the demo)",
    "sigma": "anomaly-map Gaussian blur sigma (the reference's 5 is for 256 px maps)",
    "pool_window": "image-score average-pool window (the reference's 8)",
    "image_score": "pooled: max after eight average pools (the reference); max: plain max; nll: the inverted "
                   "latent's negative log-likelihood under N(0, I) (inversion only)",
    "inversion_steps": "inversion: DDIM steps = network passes per image (default 5)",
    "inversion_end_t": "inversion: the last timestep; the steps visit round(k * end_t / steps) (default 999; InvAD's "
                       "3 steps visit 333, 666, 999)",
    "inversion_latent": "inversion: invert the VAE posterior's mean (default) or a sample of it",
    "variant": "metric definitions: standard, or the reference's (AUROC flip, AUPRO normalisation)",
    "batch_size": "global batch (default 8)",
    "seed": "noise seed (default 0; image i's noise depends on it and on i only)",
    "dtype": "compute dtype (default float32; maps and metrics stay float32)",
    "dedupe_guidance": "skip guidance's duplicate half when both contexts are equal (default true; exact)",
    "attention": "attention implementation (default: XLA's choice); cudnn: fused attention on NVIDIA GPUs "
                 "(with dtype bfloat16)",
}


def _eval_field_type(field: dataclasses.Field):
    """The argparse type of an EvalConfig field (an optional field takes its inner type)."""
    kind = typing.get_type_hints(EvalConfig)[field.name]
    inner = [t for t in typing.get_args(kind) if t is not type(None)]
    return inner[0] if inner else kind


def add_eval_config_flags(group, prefix: str = "") -> None:
    """One flag per EvalConfig field: `--<prefix><field>` with dest `<dest prefix><field>` (prefix
    "eval-" -> dest "eval.<field>", the TrainConfig section). Values are checked by EvalConfig, so
    an error names the field, which the command's Parser names by this flag."""
    dest_prefix = "eval." if prefix else ""
    for field in dataclasses.fields(EvalConfig):
        flag, dest, kind = f"--{prefix}{field.name.replace('_', '-')}", dest_prefix + field.name, _eval_field_type(field)
        help_text = EVAL_HELP[field.name]
        choices = EvalConfig.CHOICES.get(field.name)
        if kind is bool:
            group.add_argument(flag, dest=dest, type=boolean, nargs="?", const=True, default=S, metavar="BOOL",
                               help=f"{help_text} (bare flag: true)")
        elif choices:
            group.add_argument(flag, dest=dest, choices=[c for c in choices if c is not None], default=S,
                               help=help_text)
        else:
            group.add_argument(flag, dest=dest, type=kind, default=S, metavar=field.name.upper(), help=help_text)


# ---- training flags ----------------------------------------------------------------------------------

def add_train_args(ap: Parser, presets: tuple[str, ...]) -> None:
    """Flags shared by the two training programs (train, finetune-autoencoder)."""
    ap.add_argument("--preset", choices=presets, default=presets[0],
                    help=f"starting values (default {presets[0]}); see the description above")
    ap.add_argument("--config", type=Path, help="JSON file of TrainConfig fields (applied after the preset; "
                    "see --print-config)")
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved TrainConfig (nested: optimizer, data, eval, ...) as JSON and exit")

    g = ap.add_argument_group("model")
    g.add_argument("--model", default=S, help="tiny, sd15, or a ModelConfig JSON file (random init)")
    g.add_argument("--init-checkpoint", default=S,
                   help="converted model checkpoint dir (diad-jax convert): params, CLIP context, ResNet")
    g.add_argument("--dtype", dest="compute_dtype", choices=["float32", "bfloat16"], default=S,
                   help="compute dtype of training (evaluations: --eval-dtype); master weights and optimizer "
                        "state stay float32")
    g.add_argument("--trainable", choices=["reference", "sg+unet"], default=S,
                   help="what trains: 'reference' = SG network + UNet decoder (default); 'sg+unet' also the "
                        "UNet encoder (for a model trained from scratch)")
    g.add_argument("--remat", type=remat_policy, nargs="?", const="blocks", default=S, metavar="POLICY",
                   help="rematerialise each res/transformer block in the backward pass, keeping: nothing "
                        "('blocks', the least memory; bare --remat), the linear layers' outputs ('dots') or also "
                        "every convolution's ('convs_and_dots'); 'none' (default) keeps every activation. "
                        "benchmarks/RESULTS.md has the memory and time of each")

    g.add_argument("--cache-latents", dest="cache_latents", type=boolean, nargs="?", const=True, default=S,
                   help="encode every training image with the frozen VAE once (its posterior mean and log-variance, "
                        "stored beside the prepared data, keyed by the VAE weights) instead of in every step; the "
                        "step samples the posterior from them with the same noise (default false)")

    g = ap.add_argument_group("data")
    g.add_argument("--dataset", dest="data.dataset", default=S,
                   help="synthetic (default), mvtec_ad, mvtec_ad_2, visa, real_iad, folder")
    g.add_argument("--data-dir", dest="data.data_dir", default=S,
                   help="where prepared datasets live (default: $DIAD_DATA_DIR or ~/.cache/diad_jax/data)")
    g.add_argument("--manual-dir", dest="data.manual_dir", default=S,
                   help="the downloaded dataset's root folder (every dataset but synthetic)")
    g.add_argument("--dataset-option", dest="options", action="append", default=S, metavar="KEY=JSON",
                   help="a data.prepare option, e.g. train_per_class=60 or exclude='[\"screw/train/good/232.png\"]'")
    g.add_argument("--classes", dest="data.classes", nargs="+", default=S,
                   help="train on these classes only (default: all, mixed)")
    g.add_argument("--skip-bad", dest="data.skip_bad", action="store_true", default=S,
                   help="skip unreadable images and anomalous images without a mask (each one logged and listed "
                        "in the prepared copy's metadata.json) instead of stopping at the first")
    g.add_argument("--overwrite-data", dest="overwrite", action="store_true",
                   help="delete the prepared copy of the dataset and prepare it again from --manual-dir")

    g = ap.add_argument_group("optimisation")
    g.add_argument("--batch-size", dest="data.batch_size", type=int, default=S,
                   help="GLOBAL batch per step, i.e. per optimizer update (all devices, hosts and micro-batches)")
    g.add_argument("--grad-accum", dest="optimizer.grad_accum", type=int, default=S,
                   help="micro-batches per step: the step computes the batch's gradient in this many pieces "
                        "(activation memory of one piece) and makes one update")
    g.add_argument("--steps", type=int, default=S,
                   help="total steps (optimizer updates) of the run, resumed steps included; --save-every, "
                        "--eval-every, --log-every and --profile-steps count updates too")
    g.add_argument("--lr", dest="optimizer.learning_rate", type=float, default=S,
                   help="learning rate (the reference: constant 1e-5)")
    g.add_argument("--lr-schedule", dest="optimizer.schedule", choices=LR_SCHEDULES, default=S,
                   help="after the warmup: constant (default, the reference) or cosine decay to --end-lr at --steps")
    g.add_argument("--warmup-steps", dest="optimizer.warmup_steps", type=int, default=S,
                   help="linear learning-rate warmup over this many updates (default 0)")
    g.add_argument("--end-lr", dest="optimizer.end_learning_rate", type=float, default=S,
                   help="where the cosine schedule ends (default 0)")
    g.add_argument("--max-grad-norm", dest="optimizer.max_grad_norm", type=float, default=S,
                   help="clip the gradient to this global norm before AdamW (default: no clipping, the reference)")
    g.add_argument("--offload-optimizer-state", dest="optimizer.offload_state", action="store_true", default=S,
                   help="keep AdamW's moments in host memory (pinned_host) between steps, moved to the device for "
                        "each update: device memory for a larger model or batch, at the cost of the transfers")
    g.add_argument("--weight-decay", dest="optimizer.weight_decay", type=float, default=S)
    g.add_argument("--ema-decay", dest="optimizer.ema_decay", type=float, default=S,
                   help="keep an EMA of the trained params (e.g. 0.999)")
    g.add_argument("--seed", type=int, default=S)

    g = ap.add_argument_group("mesh (devices = data x fsdp; the batch is split over both)")
    g.add_argument("--mesh-data", dest="mesh.data", type=int, default=S,
                   help="data-parallel axis size (-1: all remaining devices)")
    g.add_argument("--mesh-fsdp", dest="mesh.fsdp", type=int, default=S,
                   help="fsdp axis size: shards params and optimizer state (-1: all remaining devices)")
    g.add_argument("--mesh-dcn-data", dest="mesh.dcn_data", type=int, default=S,
                   help="split the data axis over this many TPU slices (or, without slices, processes) joined by "
                        "the data-center network: a hybrid mesh, fsdp within a slice (default 1)")

    g = ap.add_argument_group("checkpoints and logging")
    g.add_argument("--workdir", default=S, help="checkpoints/, best/, metrics.jsonl, tensorboard/")
    g.add_argument("--save-every", dest="checkpoint.save_every", type=int, default=S, help="steps between checkpoints")
    g.add_argument("--keep", dest="checkpoint.keep", type=int, default=S, help="how many recent checkpoints to keep")
    g.add_argument("--async-checkpoint", dest="checkpoint.async_save", type=boolean, default=S,
                   help="save in the background (default true)")
    g.add_argument("--no-resume", dest="checkpoint.resume", action="store_false", default=S,
                   help="do not resume (fails if the workdir holds checkpoints)")
    g.add_argument("--log-every", type=int, default=S, help="steps between metric records")
    g.add_argument("--profile-steps", type=_step_range, default=S, metavar="FIRST:LAST",
                   help="write a jax.profiler trace of steps FIRST..LAST-1 (counted from 0) to <workdir>/profile "
                        "(TensorBoard's profile plugin or Perfetto open it)")
    g.add_argument("--peak-tflops", dest="peak_tflops", type=float, default=S,
                   help="the device's peak TFLOP/s for the logged MFU (default: a table of GPUs and TPUs by device "
                        "kind; none for CPUs)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = ap.add_argument_group("multi-host and runtime")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (also when DIAD_DISTRIBUTED=1); run the same "
                        "command on every host")
    g.add_argument("--coordinator", help="coordinator host:port (default: auto-detected on TPU, SLURM, Open MPI)")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    g.add_argument("--distributed-timeout", dest="timeout", type=positive_float, default=300.0, metavar="SECONDS",
                   help="how long --distributed waits for every process to start before exiting with status 2 "
                        "naming the missing ones (default 300)")
    g.add_argument("--compilation-cache", help="JAX persistent compilation cache directory")


def read_config_file(path: str | os.PathLike) -> dict:
    """The JSON object of a --config file, or a ConfigError naming the file (and the line of a syntax error)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror or e})") from e
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
    if not isinstance(d, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of config fields, got {type(d).__name__}")
    return d


def dataset_options(items) -> dict:
    """--dataset-option KEY=VALUE items (VALUE as JSON, else as a string) -> {KEY: VALUE}."""
    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--dataset-option {item!r}: expected KEY=VALUE (VALUE as JSON), e.g. train_per_class=60")
        try:
            out[key] = json.loads(val)
        except json.JSONDecodeError:
            out[key] = val
    return out


def config_from_args(base: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """The preset `base`, then the --config file (nested, or the flat names of older versions), then
    the flags given (each flag's dest is its field's dotted path, e.g. "optimizer.learning_rate"). A
    preset's dataset options belong to the preset's dataset: choosing another dataset (by file or
    flag) without options starts from none. An invalid value that came from the file is reported
    with the file and its key; one from a flag, by the flag (the command's Parser names it)."""
    d = base.to_dict()
    from_file = {}
    if args.config:
        from_file = unflatten_train_dict(read_config_file(args.config), f"--config {args.config}")[0]
    for key, value in from_file.items():
        d[key] = {**d[key], **value} if isinstance(d.get(key), dict) and isinstance(value, dict) else value
    flags = {k: v for k, v in vars(args).items() if k not in RUNTIME_FLAGS}
    for path, value in flags.items():
        set_path(d, path, value)
    if d["data"]["dataset"] != base.data.dataset and "options" not in from_file.get("data", {}):
        d["data"]["options"] = {}
    for key, value in dataset_options(getattr(args, "options", ())).items():
        if key == "skip_bad":  # older spelling of --skip-bad
            d["data"]["skip_bad"] = value in (True, "true", "1", 1)
        else:
            d["data"]["options"] = {**d["data"]["options"], key: value}
    split = d["validation"]["split"]
    if isinstance(split, str) and split.lower() in ("none", ""):
        d["validation"]["split"] = None
    try:
        return TrainConfig.from_dict(d)
    except ConfigError as e:
        if args.config and not e.fields or any(_in_file(f, from_file) and f not in flags for f in e.fields):
            raise ConfigError(f"--config {args.config}: {e}") from e
        raise


def _in_file(path: str, from_file: dict) -> bool:
    """Whether the config file (nested dict) sets the field at dotted `path`."""
    head, _, rest = path.partition(".")
    return head in from_file and (not rest or isinstance(from_file[head], dict) and _in_file(rest, from_file[head]))
