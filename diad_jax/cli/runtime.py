"""What a program sets up before its work: logging, and for training multi-host start-up and the
compilation cache, in the order a pod needs (flags checked before any JAX backend starts)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from diad_jax.cli.preflight import preflight
from diad_jax.configs import TrainConfig


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

        distributed.initialize(args.coordinator, args.num_processes, args.process_id, args.timeout)
    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
