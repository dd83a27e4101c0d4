"""Runs a training script and SIGKILLs its process once step N is done, like a preempted job:

    python tests/train_killed.py N scripts/train.py <flags>

The kill is a `diad_jax.train.Hook` added to every `Trainer.run` of the process; it waits for the
checkpoint writes in flight first, so that the test knows which checkpoint a rerun resumes from."""
import os
import runpy
import signal
import sys

from diad_jax import train


class KillAfterStep(train.Hook):
    def __init__(self, step: int):
        self.step = step

    def after_step(self, trainer, step):
        if step == self.step:
            trainer.checkpointer.wait()
            os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    kill_after, script = int(sys.argv[1]), sys.argv[2]
    run = train.Trainer.run
    train.Trainer.run = lambda self, hooks=(): run(self, hooks=(*hooks, KillAfterStep(kill_after)))
    sys.argv = [script, *sys.argv[3:]]
    runpy.run_path(script, run_name="__main__")
