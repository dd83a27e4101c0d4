"""The training loop: `Trainer` (scripts/train.py and scripts/finetune_autoencoder.py are thin CLIs
around it) and the `Hook`s it calls between steps (progress bars, the profiler, tests)."""
from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from diad_jax import sharding as shd
from diad_jax.configs import TrainConfig
from diad_jax.errors import NonFiniteError
from diad_jax.models.diad import DTYPES, DiAD, combine
from diad_jax.train.checkpoint import TRAIN_STATE_FORMAT, Checkpointer, restore_latest
from diad_jax.train.latents import cached_moments
from diad_jax.train.metrics_log import MetricWriter
from diad_jax.train.perf import device_memory, peak_tflops, throughput
from diad_jax.train.preemption import StopSignal
from diad_jax.train.sources import (ModelSource, check_batch, check_eval_resnet, prepare_data, train_iterator,
                                    validates)
from diad_jax.train.state import StepFactory
from diad_jax.train.task import Task, diad_task
from diad_jax.train.validation import Validator
from diad_jax.train.workdir_lock import WorkdirLock

log = logging.getLogger(__name__)

@dataclasses.dataclass
class StepInfo:
    """What the loop reports after each logging interval."""

    step: int
    metrics: dict[str, float]       # mean over the interval (loss, grad_norm, learning_rate, ...)
    perf: dict[str, float]          # train/perf.py: step_time_s, images_per_s, tflops_per_device, mfu?, memory_*?
    per_step_loss: list[tuple[int, float]]


class Hook:
    """Called by `Trainer.run`: `before_step(trainer, step)` with the number of steps done before the
    next one, `after_step(trainer, step)` once that step's metrics, evaluation and checkpoint (if it
    has them) are done, `after_log(trainer, info)` at every logging interval, `end(trainer)` when
    the run stops (also on an error)."""

    def before_step(self, trainer: "Trainer", step: int) -> None: ...
    def after_step(self, trainer: "Trainer", step: int) -> None: ...
    def after_log(self, trainer: "Trainer", info: StepInfo) -> None: ...
    def end(self, trainer: "Trainer") -> None: ...


class ProfileHook(Hook):
    """A jax.profiler trace of the steps first..last-1 (counted from 0) into `logdir` (TensorBoard's
    profile plugin or Perfetto read it); each step is a StepTraceAnnotation in it."""

    def __init__(self, first: int, last: int, logdir: str | Path):
        self.first, self.last, self.logdir, self.active = first, last, str(logdir), False

    def before_step(self, trainer, step):
        if step == self.first:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after_step(self, trainer, step):
        if step == self.last:
            self.end(trainer)

    def end(self, trainer):
        if self.active:
            jax.block_until_ready(trainer.state)
            jax.profiler.stop_trace()
            self.active = False
            log.info("profile of steps %d..%d written to %s", self.first, self.last - 1, self.logdir)


def check_finite_metrics(steps: Sequence[int], metrics: Sequence[dict], checkpointer: Checkpointer) -> None:
    """Stops the run (NonFiniteError) at the first step whose loss or gradient norm is not finite,
    naming the last good checkpoint; called before anything of that step is saved."""
    for s, m in zip(steps, metrics):
        bad = {k: float(m[k]) for k in ("loss", "grad_norm") if k in m and not np.isfinite(m[k])}
        if bad:
            checkpointer.wait()
            saved = checkpointer.all_steps()
            last = (f"the last good checkpoint is {checkpointer.directory}/{max(saved)} (kept; a rerun resumes "
                    f"from it)") if saved else "no checkpoint was saved before it"
            raise NonFiniteError(f"training stopped at step {s}: {', '.join(f'{k} = {v}' for k, v in bad.items())}; "
                                 f"{last}. Lower {{0}}, check the data, or start from another checkpoint",
                                 fields=["optimizer.learning_rate"])


def _millions(tree) -> float:
    return sum(x.size for x in jax.tree.leaves(tree)) / 1e6


class Trainer:
    """The training loop. `Trainer(TrainConfig.tiny(workdir="runs/x")).run()` resumes from
    runs/x/checkpoints if there is a checkpoint there; `close()` waits for the last save."""

    def __init__(self, cfg: TrainConfig, mesh: Mesh | None = None, task: Task | None = None,
                 overwrite_data: bool = False):
        self.cfg, self.task = cfg, task or diad_task(cfg)
        self.mesh = mesh or shd.config_mesh(cfg.mesh)
        log.info("mesh: %s", shd.describe_mesh(self.mesh))
        validating = validates(cfg, self.task)
        check_batch(cfg, self.mesh, validating)
        self.workdir = Path(cfg.workdir).absolute()
        source = ModelSource.from_config(cfg)
        if self.task.detects_anomalies:
            check_eval_resnet(cfg, source.has_resnet)
        self.lock = WorkdirLock(self.workdir, jax.process_index())  # released by close()
        try:
            self.model_config, self.model_meta = source.config, source.metadata(cfg, self.task)
            # one attention setting for the run: the evaluation's (eval.attention, e.g. cuDNN's fused kernel)
            self.model = DiAD(source.config, dtype=DTYPES[cfg.compute_dtype], remat=cfg.remat,
                              attention=cfg.eval.attention)
            self.factory = StepFactory(self.model, cfg, self.mesh, task=self.task)
            self.dataset = prepare_data(cfg, source.config.image_size, overwrite_data)
            self.checkpointer = Checkpointer(self.workdir / "checkpoints", keep=cfg.checkpoint.keep,
                                             async_save=cfg.checkpoint.async_save,
                                             best_directory=(self.workdir / "best") if validating else None)
            self.writer = MetricWriter(self.workdir)
            self.flops_per_step: float | None = None  # counted at the first log
            best_value = self._start(source)
            self.validator = None if not validating else Validator(
                cfg, source.config, self.mesh, self.dataset, resnet=self.resnet, writer=self.writer,
                checkpointer=self.checkpointer, model_meta=self.model_meta, best_value=best_value)
        except BaseException:
            self.lock.release()
            raise

    def _start(self, source: ModelSource) -> float:
        """Places the newest checkpoint that restores, else the source's (or fresh) params; returns
        the best validation value so far. The source's weights are read only when needed."""
        f, cfg = self.factory, self.cfg
        restored = restore_latest(self.checkpointer, f, cfg, source.config)
        resnet = None if restored is None else restored.resnet
        if restored is None or (resnet is None and source.has_resnet):
            params, context, source_resnet = source.load(self.mesh, cfg.mesh.min_shard_size)
            resnet = source_resnet if resnet is None else resnet
        if restored is None:
            params = params if params is not None else self.model.init(seed=cfg.seed)
            trainable, self.frozen = f.split(params)
            self.state = f.init_state(trainable)
            others = {g: v for g, v in params.items() if g not in self.task.groups}
            self.others = shd.place(others, {g: f.full_shardings()[g] for g in others})
            self.context, best_value = f.place_context(context), -math.inf
        else:
            self.state, self.frozen = restored.state, f.split(restored.params)[1]
            self.others = {g: v for g, v in restored.params.items() if g not in self.task.groups}
            self.context, best_value = restored.context, restored.best_value
        self.iterator = train_iterator(cfg, self.dataset, source.config.image_size, start_step=self.step)
        self.moments = None if not cfg.cache_latents else cached_moments(
            self.model, self.frozen["vae"], self.dataset, cfg.data.train_split, self.mesh,
            cfg.data.batch_size // cfg.optimizer.grad_accum)
        self.resnet = resnet  # restored replicated onto the mesh (or None)
        log.info("params: %.2fM trainable, %.2fM frozen; trainable + optimizer state: %s", _millions(self.state.params),
                 _millions(self.frozen), shd.shard_summary((self.state.params, self.state.opt_state)))
        return best_value

    @property
    def step(self) -> int:
        return int(jax.device_get(self.state.step))

    def model_params(self):
        """The full model params as evaluation and checkpoints use them: the EMA of the trained
        params when on, and every frozen group (the task's extra inputs left out)."""
        trained = self.state.ema if self.state.ema is not None else self.state.params
        frozen = {g: v for g, v in self.frozen.items() if g not in self.task.extra_frozen}
        return combine(trained, {**frozen, **self.others})

    def save(self, step: int, loss: float) -> None:
        best = self.validator.best_value if self.validator else -math.inf
        tc = {"train_config": self.cfg.to_dict(), "train_state_format": TRAIN_STATE_FORMAT, "step": step,
              "metrics": {"loss": loss},
              "best_value": best if math.isfinite(best) else None}
        self.checkpointer.save(step, state=self.state, params=self.model_params(), context=self.context,
                               resnet=self.resnet, model_meta=self.model_meta, train_config=tc)

    def evaluate(self) -> dict:
        """Scores the validation split with the current (EMA) weights, logs, keeps the best checkpoint."""
        return self.validator(self.step, self.model_params(), self.context)

    def run(self, hooks: Sequence[Hook] = ()) -> dict:
        """Train until cfg.steps: a checkpoint every checkpoint.save_every steps and at the end,
        evaluations as cfg.validation says. SIGTERM or SIGINT stops the run after a step that every
        process agrees on, saved like any other (see train/preemption.py). Stops with NonFiniteError
        at the first non-finite loss or gradient norm, before any checkpoint of it. Returns {"step",
        "loss" (last interval's mean), "eval": last results or None, "signal": the number of the
        signal that stopped the run, or 0}."""
        cfg, step = self.cfg, self.step
        if cfg.profile_steps is not None:
            hooks = (*hooks, ProfileHook(*cfg.profile_steps, self.workdir / "profile"))
        pending, last_eval, last_loss, stop = [], None, float("nan"), 0
        t_last, imgs = time.perf_counter(), 0
        with StopSignal(self.mesh, cfg.data.batch_size // jax.process_count()) as signals:
            try:
                while step < cfg.steps and not stop:
                    for h in hooks:
                        h.before_step(self, step)
                    with jax.profiler.StepTraceAnnotation("train_step", step_num=step):
                        batch = self._global_batch(next(self.iterator))
                        self.state, metrics = self.factory.step(self.state, self.frozen, self.context, batch)
                    step, imgs = step + 1, imgs + cfg.data.batch_size
                    pending.append((step, metrics))
                    stop = signals.poll()  # the same on every process
                    do_eval = not stop and self.validator is not None and (
                        (cfg.validation.every and step % cfg.validation.every == 0)
                        or (cfg.validation.at_end and step == cfg.steps))
                    do_save = step % cfg.checkpoint.save_every == 0 or step == cfg.steps or stop
                    # metrics are fetched (a device sync) at log intervals and before an evaluation or a
                    # save, so that a non-finite loss never reaches a checkpoint
                    if step % cfg.log_every == 0 or do_eval or do_save:
                        info = self._log(pending, imgs, t_last)
                        last_loss, pending, t_last, imgs = info.metrics["loss"], [], time.perf_counter(), 0
                        for h in hooks:
                            h.after_log(self, info)
                    if do_eval:
                        last_eval = self.evaluate()
                        t_last, imgs = time.perf_counter(), 0
                    if do_save:
                        self.save(step, last_loss)
                    for h in hooks:
                        h.after_step(self, step)
            finally:
                for h in hooks:
                    h.end(self)
            self.checkpointer.wait()  # inside the handlers: a signal now cannot cut the last write short
        if stop:
            log.warning("stopped by %s after step %d, saved in %s; the same command resumes the run",
                        signal.Signals(stop).name, step, self.checkpointer.directory)
        return {"step": step, "loss": last_loss, "eval": last_eval, "signal": stop}

    def _global_batch(self, local: dict) -> dict:
        """This process's share of a batch as the step's global arrays (and, with cached latents, the
        examples' posterior moments, looked up by their index)."""
        fields = {"image": local["image"], "index": local["index"]}
        if self.moments is not None:
            fields["moments"] = np.asarray(self.moments[local["index"]])
        return shd.shard_batch(fields, self.mesh)

    def _log(self, pending: list[tuple[int, dict]], images: int, since: float) -> StepInfo:
        """Fetches the pending steps' metrics, writes them, stops at the first non-finite one. Speed:
        `images` since `since` up to this fetch (steps run asynchronously: only a device sync ends an
        interval); the step's FLOPs are counted at the first log."""
        steps, host = [s for s, _ in pending], jax.device_get([m for _, m in pending])
        seconds = time.perf_counter() - since
        if self.flops_per_step is None:
            self.flops_per_step = self.factory.flops_per_step(self.state, self.frozen, self.context,
                                                              self.cfg.data.batch_size)
        device = self.mesh.local_devices[0]  # this process's: memory_stats() reads addressable devices only
        perf = {**throughput(len(steps), images, seconds, self.flops_per_step, self.mesh.devices.size,
                             self.cfg.peak_tflops or peak_tflops(device)), **device_memory(device)}
        for s, h in zip(steps, host):
            self.writer.write(s, {k: float(v) for k, v in h.items()})
        self.writer.write(steps[-1], perf, kind="perf")
        self.writer.flush()
        check_finite_metrics(steps, host, self.checkpointer)
        mean = {k: float(np.mean([h[k] for h in host])) for k in host[0]}
        return StepInfo(steps[-1], mean, perf, [(s, float(h["loss"])) for s, h in zip(steps, host)])

    def close(self):
        self.checkpointer.wait()
        self.checkpointer.close()
        self.writer.close()
        self.lock.release()
