"""What a command checks before any expensive work: the files and folders its config names exist,
its output folders are writable, the dataset options are known, the model spec resolves."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from diad_jax.configs import ModelConfig, TrainConfig
from diad_jax.errors import ConfigError


def check_writable(path: str | os.PathLike, field: str) -> None:
    """Creates `path` (the value of `field`) if needed and checks that a file can be written in it
    (before hours of work)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"{{0}} {path}: not a writable folder ({e.strerror or e})", fields=[field]) from e


def check_exists(path: str | os.PathLike | None, field: str, folder: bool) -> None:
    """A ConfigError naming `field` unless `path` (its value, if given) is an existing folder / file."""
    if path is not None and not (Path(path).is_dir() if folder else Path(path).is_file()):
        raise ConfigError(f"{{0}} {path}: no such {'folder' if folder else 'file'}", fields=[field])


def preflight(cfg: TrainConfig) -> None:
    """What can be checked of a training config before devices, weights or data are touched: every
    file and folder it names exists, the dataset options are known, the model spec resolves, the
    workdir is writable. (Mesh and batch sizes are checked first thing in `Trainer`.)"""
    from diad_jax import data
    from diad_jax.checkpoints import read_metadata
    from diad_jax.train import check_eval_resnet

    data.check_options(cfg.data.dataset, cfg.data.options)
    if cfg.init_checkpoint:
        has_resnet = bool(read_metadata(cfg.init_checkpoint, "init_checkpoint").get("has_resnet"))
    else:
        ModelConfig.from_spec(cfg.model)
        has_resnet = False
    check_eval_resnet(cfg, has_resnet)
    check_exists(cfg.data.manual_dir, "data.manual_dir", folder=True)
    check_exists(cfg.validation.data_dir, "validation.data_dir", folder=True)
    check_exists(cfg.autoencoder.lpips_vgg16, "autoencoder.lpips_vgg16", folder=False)
    check_exists(cfg.autoencoder.lpips_lin, "autoencoder.lpips_lin", folder=False)
    check_writable(cfg.workdir, "workdir")
