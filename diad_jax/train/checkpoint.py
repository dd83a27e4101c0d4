"""Training checkpoints: an orbax CheckpointManager whose step folders are also model checkpoints,
restoring the newest one that restores, and the check that a checkpoint fits the run resuming it."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from diad_jax.checkpoints import model_items, restoring, state_target
from diad_jax.configs import ModelConfig, TrainConfig, unflatten_train_dict
from diad_jax.errors import CheckpointError, ConfigError
from diad_jax.train.state import StepFactory, TrainState

log = logging.getLogger(__name__)

Params = dict[str, Any]

# Orbax's default handler writes every replicated array replica-parallel; `tune_orbax_array_handler`
# keeps that only for big arrays. It builds orbax's default handler with a size threshold, which takes
# orbax's ArrayMetadata store, a class orbax names only in its private `_src` package: so the tuning
# is applied only for the orbax versions in ORBAX_VERSIONS (what pyproject.toml allows), and
# tests/test_train_config.py checks what it relies on.
REPLICA_PARALLEL_MIN_BYTES = 4 * 2**20
ORBAX_VERSIONS = ("0.12.8", "0.13")  # from (inclusive), to (exclusive)

_ORBAX_TUNING_DONE = False


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def tune_orbax_array_handler(min_slice_bytes: int = REPLICA_PARALLEL_MIN_BYTES) -> None:
    """Orbax saves a replicated array "replica-parallel": every replica writes a slice, which costs
    one small jitted slice per array and replica -- 14 s for the tiny model's 1,700 arrays on 8
    devices. Keep that for arrays whose per-replica slice is at least `min_slice_bytes` (SD's big
    kernels) and write smaller ones from one replica. Same on-disk format; registered once per
    process, with orbax's versions in ORBAX_VERSIONS (with any other, orbax's default handler stays
    and a warning says so)."""
    global _ORBAX_TUNING_DONE
    if _ORBAX_TUNING_DONE:
        return
    _ORBAX_TUNING_DONE = True
    low, high = ORBAX_VERSIONS
    if not _version(low) <= _version(ocp.__version__) < _version(high):
        log.warning("orbax-checkpoint %s is not a version this tuning was checked on (>=%s, <%s): saving with "
                    "orbax's default array handler, which writes each replicated array from every replica",
                    ocp.__version__, low, high)
        return
    from orbax.checkpoint._src.metadata import array_metadata_store  # no public name (see above)

    handler = ocp.type_handlers.ArrayHandler(array_metadata_store=array_metadata_store.Store(),
                                             min_slice_bytes_for_replica_parallel=min_slice_bytes)
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # orbax warns that it overrides the jax.Array handler
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_log.setLevel(level)


class Checkpointer:
    """Training checkpoints under `directory`:

        <directory>/<step>/state         {"params": full params (EMA ones when on), "context", "resnet"?}
                                         (a model checkpoint)
        <directory>/<step>/model_config  JSON: ModelConfig + has_resnet      (a model checkpoint)
        <directory>/<step>/train_state   {"step", "params" (trainable), "opt_state", "ema"?, "rng"}
        <directory>/<step>/train_config  JSON: the TrainConfig and the step's metrics

    so `checkpoints.load_model(<directory>/<step>)` loads a trained model for evaluation.
    Saves are asynchronous (device arrays are copied to host memory before `save` returns);
    `keep` most recent are kept. `best_directory` (optional) holds only the model items of the
    best checkpoint by a "higher is better" metric.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
                 best_directory: str | os.PathLike | None = None):
        self.directory = Path(directory).absolute()
        tune_orbax_array_handler()
        # distinct barrier names: both managers may save the same step at once on several hosts
        mp = lambda name: ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)  # noqa: E731
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                            multiprocessing_options=mp("diad_train"))
        self.manager = ocp.CheckpointManager(self.directory, options=opts)
        self.best = None
        if best_directory is not None:
            best_opts = ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["val"], best_mode="max",
                                                     keep_checkpoints_without_metrics=False,
                                                     enable_async_checkpointing=async_save, create=True,
                                                     multiprocessing_options=mp("diad_best"))
            self.best = ocp.CheckpointManager(Path(best_directory).absolute(), options=best_opts)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, *, state: TrainState, params: Params, context, resnet, model_meta: dict,
             train_config: dict | None = None) -> None:
        """`params`: the full model params evaluation uses (the EMA of the trained ones when on)."""
        items = model_items(params, context, resnet, model_meta)
        items["train_state"] = ocp.args.StandardSave(state.as_dict())
        items["train_config"] = ocp.args.JsonSave(train_config or {})
        began = time.monotonic()
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        if jax.process_index() == 0:
            threading.Thread(target=self._report_commit, args=(step, began), daemon=True,
                             name=f"diad_jax: commit of step {step}").start()

    def committed(self, step: int) -> bool:
        """Whether step `step` is finalised on disk: its write completed and orbax renamed its
        temporary folder (`<step>.orbax-checkpoint-tmp`) to `<step>`. From then on, a kill -9 loses
        nothing of it: a rerun resumes from it."""
        return (self.directory / str(step)).is_dir()

    def _report_commit(self, step: int, began: float) -> None:
        """Logs when the save of `step` is committed (orbax finalises it in the background as soon
        as its write completes; under a busy training loop that can take several steps)."""
        while not self.committed(step):
            if time.monotonic() - began > 24 * 3600:
                return
            time.sleep(0.2)
        log.info("checkpoint %d committed to disk (%.1f s after its save began)", step, time.monotonic() - began)

    def save_best(self, step: int, value: float, *, params: Params, context, resnet, model_meta: dict,
                  metrics: dict | None = None) -> None:
        if self.best is None:
            return
        items = model_items(params, context, resnet, model_meta)
        items["train_config"] = ocp.args.JsonSave({"step": step, "val": value, "metrics": metrics or {}})
        self.best.save(step, args=ocp.args.Composite(**items), metrics={"val": float(value)}, force=True)

    def best_step(self) -> int | None:
        return None if self.best is None else self.best.best_step()

    def restore_meta(self, step: int) -> tuple[dict, dict]:
        with restoring(self.directory / str(step), "the model_config and train_config items"):
            r = self.manager.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore(),
                                                                   train_config=ocp.args.JsonRestore()))
        return dict(r["model_config"]), dict(r["train_config"])

    def restore(self, step: int, *, abstract_state: TrainState, state_target: dict):
        """Restore onto the shardings the targets carry (any mesh): `abstract_state` for the train
        state, `state_target` (`checkpoints.state_target`) for the model items. Returns (state,
        {"params", "context", "resnet"?}). (Checkpoints of older versions also hold the data
        iterator's state: not needed, the data position is a function of the step.)"""
        items = dict(state=ocp.args.StandardRestore(state_target),
                     train_state=ocp.args.StandardRestore(abstract_state.as_dict()))
        with restoring(self.directory / str(step), "the model weights and train state"):
            r = self.manager.restore(step, args=ocp.args.Composite(**items))
        return TrainState.from_dict(r["train_state"]), r["state"]

    def set_aside(self, step: int) -> Path:
        """Moves an unrestorable step out of the manager's folder (to <directory>_unrestorable/<step>),
        so that nothing is deleted and training can save that step number again."""
        aside = self.directory.with_name(self.directory.name + "_unrestorable") / str(step)
        if jax.process_index() == 0:
            aside.parent.mkdir(parents=True, exist_ok=True)
            if aside.exists():
                aside = aside.with_name(f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            (self.directory / str(step)).rename(aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"diad_jax.train: set aside step {step}")
        self.manager.reload()
        return aside

    def wait(self):
        self.manager.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def close(self):
        self.manager.close()
        if self.best is not None:
            self.best.close()


# The train state's layout version, saved in each checkpoint's train_config item. 2: accumulation
# inside the step (no accumulator in the optimizer state, steps count updates). Checkpoints without it
# are version 1, which accumulated with optax.MultiSteps when optimizer.grad_accum > 1.
TRAIN_STATE_FORMAT = 2


def _state_layout(tc: dict) -> dict[tuple[str, str], Any]:
    """{(field path, what of it counts): value} of the TrainConfig fields (as a nested dict) that
    shape the train state: a checkpoint restores only into a run that agrees."""
    opt = tc.get("optimizer", {})
    return {("optimizer.ema_decay", "on/off"): opt.get("ema_decay") is not None,
            ("optimizer.max_grad_norm", "on/off"): opt.get("max_grad_norm") is not None,
            ("optimizer.schedule", "constant or scheduled"):
                opt.get("schedule", "constant") != "constant" or bool(opt.get("warmup_steps")),
            ("trainable", "value"): tc.get("trainable", "reference")}


def check_resume_compatible(saved: dict, cfg: TrainConfig, where: str, train_state_format: int = 1) -> None:
    """Refuses to resume from a checkpoint whose train state has another layout than this run's
    (EMA added or removed, clipping or a learning-rate schedule switched on or off, another trainable
    subset, or optax.MultiSteps accumulation from train-state format 1) and names the fields; a changed
    value that keeps the layout (e.g. another EMA decay) is logged. `saved` is the checkpoint's
    TrainConfig dict (older checkpoints: flat names)."""
    if not saved:
        return
    saved, _ = unflatten_train_dict(saved, f"{where}: train_config")
    if train_state_format < 2 and (saved.get("optimizer", {}).get("grad_accum") or 1) > 1:
        raise CheckpointError(
            f"{where} was saved by diad_jax 0.1.0 before train-state format {TRAIN_STATE_FORMAT}: its run accumulated "
            f"gradients with optax.MultiSteps (an accumulator in the optimizer state) and counted micro-batches as "
            f"steps; steps now count optimizer updates on {{0}} images ({{1}} micro-batches inside the step). It "
            f"cannot be resumed: start a new {{2}} from its weights ({{3}} {where}), with {{0}} = its batch size "
            f"x its accumulation", fields=["data.batch_size", "optimizer.grad_accum", "workdir", "init_checkpoint"])
    new = cfg.to_dict()
    old_layout, new_layout = _state_layout(saved), _state_layout(new)
    differ = [k for k in old_layout if old_layout[k] != new_layout[k]]
    if differ:
        diff = "; ".join(f"{{{i}}} ({what}): checkpoint {old_layout[k]}, this run {new_layout[k]}"
                         for i, k in enumerate(differ) for what in [k[1]])
        raise ConfigError(f"{where} was saved by a run with another train-state layout ({diff}); resume with the "
                          f"checkpoint's settings (see its train_config item) or use a new {{{len(differ)}}}",
                          fields=[path for path, _ in differ] + ["workdir"])
    for section, key in (("optimizer", "ema_decay"), ("optimizer", "learning_rate"), ("optimizer", "grad_accum"),
                         ("data", "batch_size"), ("optimizer", "weight_decay")):
        old, now = saved.get(section, {}), new[section]
        if key in old and old[key] != now[key]:
            log.warning("resuming %s with %s.%s = %s (the checkpoint's run used %s)", where, section, key, now[key],
                        old[key])


@dataclasses.dataclass
class Restored:
    """What `restore_latest` brings back, placed on the run's mesh."""

    state: TrainState
    params: Params                  # the full model params (EMA ones when on)
    context: jax.Array
    resnet: Params | None
    best_value: float               # the best validation value so far (-inf: none yet)


def restore_latest(checkpointer: Checkpointer, factory: StepFactory, cfg: TrainConfig,
                   model_config: ModelConfig) -> Restored | None:
    """The newest checkpoint that restores into this run (None: there is none). A checkpoint that
    does not restore is set aside (moved, never deleted) and the next older one is tried; when none
    restores, a CheckpointError lists why for each."""
    steps = sorted(checkpointer.all_steps(), reverse=True)
    if steps and not cfg.checkpoint.resume:
        raise CheckpointError(f"{checkpointer.directory} holds checkpoints (latest step {steps[0]}) but "
                              f"resuming is off ({{0}}); use another {{1}}", fields=["checkpoint.resume", "workdir"])
    failed: list[tuple[int, CheckpointError]] = []
    restored = None
    for step in steps:  # newest first
        try:
            restored = _restore(checkpointer, step, factory, cfg, model_config)
            break
        except CheckpointError as e:
            failed.append((step, e))
    if steps and restored is None:
        raise CheckpointError(f"none of the checkpoints in {checkpointer.directory} restores:\n"
                              + "\n".join(f"  step {s}: {e}" for s, e in failed))
    for step, e in failed:
        aside = checkpointer.set_aside(step)
        log.warning("%s\n  -> moved to %s; resumed from the newest checkpoint that restores (step %d)", e, aside,
                    int(restored.state.step))
    return restored


def _restore(checkpointer: Checkpointer, step: int, factory: StepFactory, cfg: TrainConfig,
             model_config: ModelConfig) -> Restored:
    where = f"{checkpointer.directory}/{step}"
    meta, tmeta = checkpointer.restore_meta(step)
    saved_cfg = ModelConfig.from_dict(meta["model_config"])
    if saved_cfg != model_config:
        raise ConfigError(f"{where}: the checkpoint's model config differs from this run's ({saved_cfg} vs "
                          f"{model_config}); use its {{0}}/{{1}} or a new {{2}}",
                          fields=["model", "init_checkpoint", "workdir"])
    check_resume_compatible(tmeta.get("train_config", {}), cfg, where, tmeta.get("train_state_format", 1))
    state, model = checkpointer.restore(
        step, abstract_state=factory.abstract_state_with_shardings(),
        state_target=state_target(model_config, bool(meta.get("has_resnet")), factory.mesh, cfg.mesh.min_shard_size))
    best = tmeta.get("best_value")
    log.info("resumed from %s (step %d)", where, int(state.step))
    return Restored(state, model["params"], model["context"], model.get("resnet"),
                    -math.inf if best is None else float(best))
