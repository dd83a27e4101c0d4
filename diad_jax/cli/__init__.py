"""Command-line plumbing of the `diad-jax` programs (diad_jax/commands), one idea per module:

  boundary   the error boundary (`command`, `Parser`: user errors on one line, fields named by flags)
  flags      the flags and how they become a TrainConfig (EvalConfig flags generated from its fields)
  scoring    the scoring programs' flags -> a checkpoint and an EvalConfig; loading the detector
  preflight  checks made before any expensive work
  runtime    logging; multi-host start-up and the compilation cache
  progress   the progress bar and end-of-run report around `Trainer.run`

Only this package and diad_jax/commands know flag names; the library names config fields and
argument names. Importing it stays light (no JAX) so that `--help` is fast."""
from diad_jax.cli.boundary import Parser, command
from diad_jax.cli.flags import (add_eval_config_flags, add_train_args, boolean, config_from_args, dataset_options,
                                nonnegative_int, positive_float, positive_int)
from diad_jax.cli.preflight import check_writable
from diad_jax.cli.progress import run, write_config
from diad_jax.cli.runtime import setup_logging, start
from diad_jax.cli.scoring import add_checkpoint_arg, add_eval_args, load_detector, scoring_checkpoint

# what the programs use; the rest stays inside the package
__all__ = ["Parser", "command", "add_eval_config_flags", "add_train_args", "boolean", "config_from_args",
           "dataset_options", "nonnegative_int", "positive_float", "positive_int", "check_writable", "run",
           "write_config", "setup_logging", "start", "add_checkpoint_arg", "add_eval_args", "load_detector",
           "scoring_checkpoint"]
