"""Stopping a run on SIGTERM or SIGINT at a step that every process agrees on.

Pods and clusters preempt with SIGTERM (TPU VMs, SLURM, Kubernetes), people with Ctrl-C, and on
several hosts the signal reaches the processes at different steps (or only one of them). A
process that saved alone would enter orbax's collective save out of step and hang the job. So a
signal only sets a flag; every step, each process contributes its flag to one tiny all-reduce
(`jnp.max` over a batch-sharded array), and the result, read one step late so that the host
stays a step ahead of the devices, is the same on every process: all of them stop after the same
step, save it through the loop's ordinary save (with its non-finite check), wait for the write
and return the signal's number (the commands exit with 128 + it: 143 for SIGTERM, 130 for SIGINT).

A second SIGINT raises KeyboardInterrupt at once (nothing more is saved); a signal that arrives
before the loop starts or after it ends has its default effect.
"""
from __future__ import annotations

import logging
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from diad_jax import sharding as shd

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    """`with StopSignal(mesh, rows) as stop:` installs the handlers (main thread only) for the
    block; `stop.poll()` once per step returns 0 or the number of the signal some process got
    (the same answer on every process). `rows`: this process's rows of a global batch (the flag
    array is laid out like one)."""

    def __init__(self, mesh: Mesh, rows: int):
        self.mesh, self.rows = mesh, rows
        self.signum = 0                  # the first signal this process received (0: none)
        self._any = jax.jit(jnp.max, out_shardings=shd.replicated(mesh))
        self._in_flight = None           # the all-reduce dispatched by the previous poll
        self._previous_handlers: dict = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous_handlers = {s: signal.signal(s, self._handle) for s in SIGNALS}
        else:
            log.warning("training outside the main thread: SIGTERM and SIGINT are not handled (no save on them)")
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous_handlers.items():
            signal.signal(s, handler)
        self._previous_handlers = {}

    def _handle(self, signum, frame) -> None:
        if self.signum:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # Ctrl-C again: stop now, without a save
            return
        self.signum = signum
        log.warning("%s received: stopping after the next step that every process agrees on, with a checkpoint "
                    "(Ctrl-C again stops at once, without one)", signal.Signals(signum).name)

    def poll(self) -> int:
        """Dispatches this step's all-reduce of the flags and returns the previous one's result."""
        previous = self._in_flight
        flags = shd.shard_batch({"stop": np.full(self.rows, self.signum, np.int32)}, self.mesh)["stop"]
        self._in_flight = self._any(flags)
        return 0 if previous is None else int(jax.device_get(previous))
