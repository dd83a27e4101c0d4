"""A training run as a program shows it: a tqdm bar and periodic log lines around `Trainer.run`,
the run's config written beside its checkpoints, and the signal that stopped it."""
from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

from diad_jax.cli.boundary import StoppedBySignal
from diad_jax.configs import TrainConfig

log = logging.getLogger("diad_jax.train")


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
            mfu = {"mfu": f"{info.perf['mfu']:.1%}"} if "mfu" in info.perf else {}
            self.bar.set_postfix(loss=f"{info.metrics['loss']:.4f}", img_s=f"{info.perf['images_per_s']:.1f}",
                                 **mfu)
        if self.bar is None or info.step % self.log_interval == 0:
            perf = info.perf
            optional = (("mfu", "MFU", ".1%"), ("memory_in_use_gib", "memory GiB", ".2f"),
                        ("memory_peak_gib", "peak GiB", ".2f"))
            extra = "".join(f", {label} {perf[k]:{fmt}}" for k, label, fmt in optional if k in perf)
            log.info("step %d: loss %.4f, lr %.3g, %.3f s/step, %.1f images/s, %.2f TFLOP/s per device%s", info.step,
                     info.metrics["loss"], info.metrics["learning_rate"], perf["step_time_s"], perf["images_per_s"],
                     perf["tflops_per_device"], extra)

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
    """The resolved config in <workdir>/`name` (process 0)."""
    import jax

    if jax.process_index() == 0:
        Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.workdir) / name).write_text(cfg.to_json())
