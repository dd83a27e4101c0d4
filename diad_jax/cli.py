"""Command-line plumbing shared by the entry points (scripts/*.py, convert/*.py): one logging
set-up, one error boundary (`entry_point`), and for the two training scripts the flags that map
onto TrainConfig fields, the checks made before any expensive work (`preflight`), runtime set-up
(multi-host, compilation cache) and a tqdm progress loop around `Trainer.run`."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

from diad_jax.configs import (COMPARATORS, NO_WEIGHTS_COMPARATOR, EvalConfig, ModelConfig, TrainConfig, set_path,
                              unflatten_train_dict)
from diad_jax.errors import ConfigError, UserError

log = logging.getLogger("diad_jax.train")

# the flags that are not TrainConfig fields (each of the others has its field's dotted path as its dest)
_RUNTIME = {"preset", "config", "print_config", "no_progress", "distributed", "coordinator", "num_processes",
            "process_id", "distributed_timeout", "compilation_cache", "overwrite_data"}


class StoppedBySignal(Exception):
    """A training run stopped by SIGTERM or SIGINT after saving (`run`); the command exits 128 + signum."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def entry_point(main):
    """Wraps a script's `main(argv) -> int`: a user error (`UserError`: a bad flag, config, file or
    dataset; `OSError`: a missing or unwritable path) prints `error: <message>` on stderr and returns
    2, Ctrl-C returns 130, a training run stopped (and saved) by a signal returns 128 + its number
    (143 for SIGTERM, 130 for SIGINT), all without a traceback. DIAD_TRACEBACK=1 re-raises instead
    (for bug reports)."""

    @functools.wraps(main)
    def wrapper(argv=None) -> int:
        try:
            return main(argv)
        except StoppedBySignal as e:
            print(str(e), file=sys.stderr)
            return 128 + e.signum
        except (UserError, OSError) as e:
            if os.environ.get("DIAD_TRACEBACK") == "1":
                raise
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if os.environ.get("DIAD_TRACEBACK") == "1":
                raise
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


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


def add_common_args(ap: argparse.ArgumentParser, presets: tuple[str, ...]) -> None:
    """Flags shared by both scripts. Every flag defaults to "not given" (argparse.SUPPRESS), so only
    what is typed overrides the preset and the --config file."""
    S = argparse.SUPPRESS
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
    g.add_argument("--remat", type=_bool, nargs="?", const=True, default=S,
                   help="rematerialise blocks in the backward pass (less memory, more compute)")

    g = ap.add_argument_group("data")
    g.add_argument("--dataset", dest="data.dataset", default=S,
                   help="synthetic (default), mvtec_ad, mvtec_ad_2, visa, real_iad, folder")
    g.add_argument("--data-dir", dest="data.data_dir", default=S,
                   help="where prepared datasets live (default: $DIAD_DATA_DIR or ~/.cache/diad_jax/data)")
    g.add_argument("--manual-dir", dest="data.manual_dir", default=S,
                   help="the downloaded dataset's root folder (every dataset but synthetic)")
    g.add_argument("--dataset-option", action="append", default=S, metavar="KEY=JSON",
                   help="a data.prepare option, e.g. train_per_class=60 or exclude='[\"screw/train/good/232.png\"]'")
    g.add_argument("--classes", dest="data.classes", nargs="+", default=S,
                   help="train on these classes only (default: all, mixed)")
    g.add_argument("--skip-bad", dest="data.skip_bad", action="store_true", default=S,
                   help="skip unreadable images and anomalous images without a mask (each one logged and listed "
                        "in the prepared copy's metadata.json) instead of stopping at the first")
    g.add_argument("--overwrite-data", action="store_true",
                   help="delete the prepared copy of the dataset and prepare it again from --manual-dir")

    g = ap.add_argument_group("optimisation")
    g.add_argument("--batch-size", dest="data.batch_size", type=int, default=S,
                   help="GLOBAL batch per step (all devices and hosts)")
    g.add_argument("--grad-accum", dest="optimizer.grad_accum", type=int, default=S, help="steps per optimizer update")
    g.add_argument("--steps", type=int, default=S, help="total steps (batches) of the run, resumed steps included")
    g.add_argument("--lr", dest="optimizer.learning_rate", type=float, default=S, help="constant learning rate")
    g.add_argument("--weight-decay", dest="optimizer.weight_decay", type=float, default=S)
    g.add_argument("--ema-decay", dest="optimizer.ema_decay", type=float, default=S,
                   help="keep an EMA of the trained params (e.g. 0.999)")
    g.add_argument("--seed", type=int, default=S)

    g = ap.add_argument_group("mesh (devices = data x fsdp; the batch is split over both)")
    g.add_argument("--mesh-data", dest="mesh.data", type=int, default=S,
                   help="data-parallel axis size (-1: all remaining devices)")
    g.add_argument("--mesh-fsdp", dest="mesh.fsdp", type=int, default=S,
                   help="fsdp axis size: shards params and optimizer state (-1: all remaining devices)")

    g = ap.add_argument_group("checkpoints and logging")
    g.add_argument("--workdir", default=S, help="checkpoints/, best/, metrics.jsonl, tensorboard/")
    g.add_argument("--save-every", dest="checkpoint.save_every", type=int, default=S, help="steps between checkpoints")
    g.add_argument("--keep", dest="checkpoint.keep", type=int, default=S, help="how many recent checkpoints to keep")
    g.add_argument("--async-checkpoint", dest="checkpoint.async_save", type=_bool, default=S,
                   help="save in the background (default true)")
    g.add_argument("--no-resume", dest="checkpoint.resume", action="store_false", default=S,
                   help="do not resume (fails if the workdir holds checkpoints)")
    g.add_argument("--log-every", type=int, default=S, help="steps between metric records")
    g.add_argument("--profile-steps", type=_step_range, default=S, metavar="FIRST:LAST",
                   help="write a jax.profiler trace of steps FIRST..LAST-1 (counted from 0) to <workdir>/profile "
                        "(TensorBoard's profile plugin or Perfetto open it)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = ap.add_argument_group("multi-host and runtime")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (also when DIAD_DISTRIBUTED=1); run the same "
                        "command on every host")
    g.add_argument("--coordinator", help="coordinator host:port (default: auto-detected on TPU, SLURM, Open MPI)")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    g.add_argument("--distributed-timeout", type=positive_float, default=300.0, metavar="SECONDS",
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


def config_from_args(base: TrainConfig, args: argparse.Namespace, ap: argparse.ArgumentParser) -> TrainConfig:
    """The preset `base`, then the --config file (nested, or the flat names of older versions), then
    the flags given (`ap` parsed them; each flag's dest is its field's dotted path, e.g.
    "optimizer.learning_rate"). A preset's dataset options belong to the preset's dataset: choosing
    another dataset (by file or flag) without options starts from none. An invalid value is reported
    with the flag or file it came from."""
    d = base.to_dict()
    from_file = unflatten_train_dict(read_config_file(args.config))[0] if args.config else {}
    for key, value in from_file.items():
        d[key] = {**d[key], **value} if isinstance(d.get(key), dict) and isinstance(value, dict) else value
    flags = {k: v for k, v in vars(args).items() if k not in _RUNTIME and k != "dataset_option"}
    for path, value in flags.items():
        set_path(d, path, value)
    if d["data"]["dataset"] != base.data.dataset and "options" not in from_file.get("data", {}):
        d["data"]["options"] = {}
    for key, value in dataset_options(getattr(args, "dataset_option", ())).items():
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
        raise ConfigError(f"{_origin(e, flags, from_file, args, ap)}: {e}") from e


def _origin(e: ConfigError, flags: dict, from_file: dict, args: argparse.Namespace, ap) -> str:
    """Which flag, file or preset the invalid field of `e` ("<Section>.<field> ...") came from."""
    sections = {cls.__name__: name + "." for name, cls in TrainConfig.SECTIONS.items()} | {"TrainConfig": ""}
    hit = re.search(r"\b(\w+Config)\.(\w+)", str(e))
    path = sections.get(hit.group(1), "") + hit.group(2) if hit else None
    options = {a.dest: a.option_strings[0] for a in ap._actions if a.option_strings}
    if path in flags and path in options:
        return f"{options[path]} {flags[path]}"
    section, _, field = (path or "").rpartition(".")
    if (path in from_file or field in from_file.get(section, {})) or (path is None and args.config):
        return f"--config {args.config}"
    return f"--preset {args.preset}"


def add_eval_args(ap: argparse.ArgumentParser) -> None:
    """The EvalConfig flags of scripts/evaluate.py and scripts/predict.py. Each one given overrides
    the checkpoint's recorded eval config (see `scoring_checkpoint`); the others keep it."""
    S = argparse.SUPPRESS
    g = ap.add_argument_group("scoring (default: what the checkpoint records, else the reference's)")
    g.add_argument("--preset", choices=["fast"], default=None,
                   help="fast: ONE network pass per image (pred_x0 at t=700) instead of 10 DDIM steps; measured on "
                        "the demo only (README, 'Scoring'); the flags below still apply on top")
    g.add_argument("--batch-size", type=positive_int, default=S, help="global batch (default 8)")
    g.add_argument("--ddim-steps", type=positive_int, default=S, help="DDIM steps (default 10)")
    g.add_argument("--schedule", choices=["official", "consistent"], default=S,
                   help="official: noise to t=999 then DDIM 901..1 as the reference; consistent: noise to 901")
    g.add_argument("--start-t", type=positive_int, default=S,
                   help="noise the latent to this timestep and start the DDIM steps there (with --schedule "
                        "consistent; any --ddim-steps up to it; default: the schedule's, 999 / 901)")
    g.add_argument("--one-step", action="store_true", default=S,
                   help="reconstruct from ONE eps evaluation at --start-t (its DDIM pred_x0; --ddim-steps 1)")
    g.add_argument("--comparator", choices=COMPARATORS, default=S,
                   help="what compares input and reconstruction: resnet (the reference, needs ImageNet weights), "
                        f"pixel_l1, ssim or vae (no weights needed; {NO_WEIGHTS_COMPARATOR} measured best on the demo)")
    g.add_argument("--eta", type=float, default=S, help="DDIM eta (default 0)")
    g.add_argument("--guidance-scale", type=float, default=S, help="default 9")
    g.add_argument("--no-dedupe", dest="dedupe_guidance", action="store_false", default=S,
                   help="run the reference's duplicate guidance half even though both contexts are equal")
    g.add_argument("--image-score", choices=["pooled", "max"], default=S,
                   help="pooled: max after eight 8x8 average pools (the reference); max: plain max")
    g.add_argument("--sigma", type=positive_float, default=S,
                   help="anomaly-map Gaussian blur sigma (the reference's 5, or scaled with --scaled-footprint)")
    g.add_argument("--pool-window", type=positive_int, default=S,
                   help="image-score average-pool window (the reference's 8, or scaled)")
    g.add_argument("--scaled-footprint", action="store_true",
                   help="scale sigma and the pool window with the image size (5 and 8 at 256 px; 64 px: 1.25 and 2)")
    g.add_argument("--variant", choices=["standard", "reference"], default=S,
                   help="metric definitions: standard, or the reference's (AUROC flip, AUPRO normalisation)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 compute (maps and metrics stay float32)")
    g.add_argument("--attention", choices=["xla", "cudnn"], default=S,
                   help="attention implementation (default: XLA's choice); cudnn: fused attention on NVIDIA GPUs "
                        "(with --bf16)")
    g.add_argument("--seed", type=nonnegative_int, default=S, help="noise seed (default 0)")
    g.add_argument("--random-resnet", action="store_true",
                   help="opt in to a randomly initialised ResNet-50 when the checkpoint has none (maps then "
                        "compare random features)")
    g.add_argument("--accept-calibration-mismatch", action="store_true",
                   help="label with the checkpoint's thresholds although the flags above score differently from "
                        "how they were calibrated (refused without it: the labels would be wrong)")


_EVAL_FLAGS = ("batch_size", "ddim_steps", "schedule", "start_t", "one_step", "comparator", "eta", "guidance_scale",
               "dedupe_guidance", "image_score", "sigma", "pool_window", "variant", "seed", "attention")


def add_checkpoint_arg(ap: argparse.ArgumentParser) -> None:
    """--checkpoint of the scoring programs (read with `scoring_checkpoint`)."""
    ap.add_argument("--checkpoint", required=True,
                    help="model checkpoint (diad-jax convert), a training --workdir of diad-jax train (its best "
                         "checkpoint if it has one, else the newest), or random:tiny (random weights)")


def scoring_checkpoint(args: argparse.Namespace) -> tuple[str, EvalConfig]:
    """--checkpoint as a model checkpoint folder (a training workdir resolved to its checkpoint; a
    random:<model> spec kept as given) and the EvalConfig to score it with: the one its thresholds
    were calibrated with, else the one it records, else the default (`detector.scoring_settings`),
    with the flags of `add_eval_args` applied. Reads only the checkpoint's
    metadata, so bad flag values are found before any weights are read."""
    from diad_jax import checkpoints
    from diad_jax.calibration import Calibration
    from diad_jax.detector import RANDOM_PREFIX, scoring_settings

    checkpoint = args.checkpoint
    if checkpoint.startswith(RANDOM_PREFIX):
        recorded, image_size = {}, ModelConfig.from_spec(checkpoint[len(RANDOM_PREFIX):], "--checkpoint").image_size
    else:
        checkpoint = str(checkpoints.resolve(checkpoint, "--checkpoint"))
        meta = checkpoints.read_metadata(checkpoint, "--checkpoint")
        checkpoints.require_detector(meta, checkpoint)  # before anything is created or loaded
        recorded, image_size = scoring_settings(meta, Calibration.load(checkpoint)), meta["model_config"]["image_size"]
    ec = EvalConfig.from_dict(recorded, f"{checkpoint}: eval_config")
    if args.preset == "fast":  # before the explicit sampler flags
        ec = ec.fast()
    if args.scaled_footprint:  # before an explicit --sigma / --pool-window
        ec = ec.scaled_footprint(image_size)
    changes = {k: getattr(args, k) for k in _EVAL_FLAGS if hasattr(args, k)}
    if args.bf16:
        changes["dtype"] = "bfloat16"
    try:
        return checkpoint, dataclasses.replace(ec, **changes)
    except ConfigError as e:
        raise ConfigError(f"{e} (from the flags {', '.join('--' + k.replace('_', '-') for k in changes)})") from e


def load_detector(args: argparse.Namespace, checkpoint: str, eval_config: EvalConfig, mesh=None):
    """`diad_jax.load` of what `scoring_checkpoint` gave, with --random-resnet's opt-in; logs what
    the detector notes (e.g. a random ResNet-50)."""
    from diad_jax.detector import load

    detector = load(checkpoint, mesh=mesh, eval_config=eval_config,
                    resnet="random" if args.random_resnet else "checkpoint",
                    accept_calibration_mismatch=args.accept_calibration_mismatch)
    for note in detector.notes:
        logging.getLogger("diad_jax.detector").warning(note)
    return detector


def check_writable(path: str | os.PathLike, flag: str) -> None:
    """Creates `path` if needed and checks that a file can be written in it (before hours of work)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path}: not a writable folder ({e.strerror or e})") from e


def check_exists(path: str | os.PathLike | None, flag: str, folder: bool) -> None:
    """A ConfigError naming `flag` unless `path` (if given) is an existing folder / file."""
    if path is not None and not (Path(path).is_dir() if folder else Path(path).is_file()):
        raise ConfigError(f"{flag} {path}: no such {'folder' if folder else 'file'}")


def preflight(cfg: TrainConfig) -> None:
    """What can be checked before devices, weights or data are touched: every file and folder the
    config names exists, the dataset options are known, the model spec resolves, the workdir is
    writable. (Mesh and batch sizes are checked first thing in `Trainer`.)"""
    from diad_jax import data
    from diad_jax.checkpoints import read_metadata
    from diad_jax.train import check_eval_resnet

    data.check_options(cfg.data.dataset, cfg.data.options)
    if cfg.init_checkpoint:
        has_resnet = bool(read_metadata(cfg.init_checkpoint, flag="--init-checkpoint").get("has_resnet"))
    else:
        ModelConfig.from_spec(cfg.model)
        has_resnet = False
    check_eval_resnet(cfg, has_resnet)
    check_exists(cfg.data.manual_dir, "--manual-dir", folder=True)
    check_exists(cfg.validation.data_dir, "--eval-data-dir", folder=True)
    check_exists(cfg.autoencoder.lpips_vgg16, "--lpips-vgg16", folder=False)
    check_exists(cfg.autoencoder.lpips_lin, "--lpips-lin", folder=False)
    check_writable(cfg.workdir, "--workdir")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (a redirect, a test's capture),
    not to the stream that was current when logging was set up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def setup_logging() -> None:
    """INFO logging with timestamps for every entry point; the chatty libraries at WARNING.
    `force=True`: importing orbax/absl may already have configured the root logger, which would
    make a plain basicConfig a no-op (and the INFO lines silently lost)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[_StderrHandler()], force=True)
    for noisy in ("absl", "orbax", "jax._src.xla_bridge", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def start(cfg: TrainConfig, args: argparse.Namespace) -> None:
    """What a training command does before its Trainer: `preflight` (no JAX backend touched: the
    metadata of checkpoints is read as plain JSON), then `init_runtime`. In this order a flag error
    stops every process at once, and jax.distributed.initialize still comes before any backend."""
    preflight(cfg)
    init_runtime(args)


def init_runtime(args: argparse.Namespace) -> None:
    """jax.distributed (if asked; see diad_jax/distributed.py) and the compilation cache. Call
    before touching devices."""
    import jax

    if args.distributed or os.environ.get("DIAD_DISTRIBUTED") == "1":
        from diad_jax import distributed

        distributed.initialize(args.coordinator, args.num_processes, args.process_id, args.distributed_timeout)
    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


class ProgressHook:
    """A tqdm bar (process 0) over the run's steps showing loss and images/s; the loss is also
    logged every 10 logging intervals (every interval without a bar). A diad_jax.train.Hook (not
    subclassed, so that importing this module stays light for --help)."""

    def __init__(self, trainer, show_bar: bool):
        import jax
        from tqdm import tqdm

        self.log_interval = 10 * trainer.cfg.log_every
        self.bar = None
        if show_bar and jax.process_index() == 0:
            self.bar = tqdm(total=trainer.cfg.steps, initial=trainer.step, desc=trainer.task.name, unit="step",
                            dynamic_ncols=True)

    def before_step(self, trainer, step):
        pass

    def after_step(self, trainer, step):
        if self.bar is not None:
            self.bar.update(1)

    def after_log(self, trainer, info):
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{info.metrics['loss']:.4f}", img_s=f"{info.images_per_s:.1f}")
        if self.bar is None or info.step % self.log_interval == 0:
            log.info("step %d: loss %.4f, %.1f images/s", info.step, info.metrics["loss"], info.images_per_s)

    def end(self, trainer):
        if self.bar is not None:
            self.bar.close()


def run(trainer, no_progress: bool = False, hooks=()) -> dict:
    """`trainer.run()` with a progress bar (unless `no_progress`) and `hooks`; closes the trainer.
    A run stopped by a signal (saved) raises StoppedBySignal."""
    cfg = trainer.cfg
    t0 = time.perf_counter()
    try:
        result = trainer.run(hooks=(ProgressHook(trainer, not no_progress), *hooks))
    finally:
        trainer.close()
    if result["signal"]:
        raise StoppedBySignal(result["signal"], f"stopped by {signal.Signals(result['signal']).name} at step "
                                                f"{result['step']}, saved in {trainer.checkpointer.directory}; "
                                                f"run the same command again to resume")
    log.info("done: step %d, last loss %.4f, %.1fs; checkpoints in %s", result["step"], result["loss"],
             time.perf_counter() - t0, trainer.checkpointer.directory)
    if trainer.checkpointer.best_step() is not None:
        log.info("best checkpoint (by %s on the %s split): %s/%d", cfg.validation.best_metric, cfg.validation.split,
                 trainer.checkpointer.best.directory, trainer.checkpointer.best_step())
    return result


def write_config(cfg: TrainConfig, name: str = "train_config.json") -> None:
    import jax

    if jax.process_index() == 0:
        Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.workdir) / name).write_text(cfg.to_json())
