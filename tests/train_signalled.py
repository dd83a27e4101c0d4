"""Runs a training script and sends its own process a signal once step N is done, like a
preempted or killed job:

    python tests/train_signalled.py TERM N scripts/train.py <flags>    # SIGTERM after step N
    python tests/train_signalled.py KILL N scripts/train.py <flags>    # kill -9 once step N is done and
                                                                       # its newest save is committed

The signal comes from a `diad_jax.train.Hook` added to every `Trainer.run` of the process. Before a
SIGKILL it polls (it does not wait on the checkpointer, which would finalise the save itself) until
the newest save up to step N is committed on disk, so that the test knows where a rerun resumes."""
import os
import runpy
import signal
import sys
import time

from diad_jax import train


class SignalAfterStep(train.Hook):
    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step

    def after_step(self, trainer, step):
        if step != self.step:
            return
        if self.signum == signal.SIGKILL:
            saved = step - step % trainer.cfg.checkpoint.save_every
            deadline = time.monotonic() + 120
            while saved and not trainer.checkpointer.committed(saved) and time.monotonic() < deadline:
                time.sleep(0.05)
        os.kill(os.getpid(), self.signum)


if __name__ == "__main__":
    signum, step, script = getattr(signal, "SIG" + sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    run = train.Trainer.run
    train.Trainer.run = lambda self, hooks=(): run(self, hooks=(*hooks, SignalAfterStep(signum, step)))
    sys.argv = [script, *sys.argv[4:]]
    runpy.run_path(script, run_name="__main__")
