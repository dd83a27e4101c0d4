"""The field checks the configs' `__post_init__` share. Each raises a ConfigError naming the field
relative to the config that checks it (`sigma`, not `eval.sigma`: a section's errors are
re-raised `.under(section)` by whoever holds it, see serialization.Section.from_dict)."""
from __future__ import annotations

import math

from diad_jax.errors import ConfigError


def require_finite(config, *names: str) -> None:
    """Each named field of `config` is a finite number (not a bool)."""
    for name in names:
        v = getattr(config, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ConfigError(f"{{0}} must be a finite number, got {v!r}", fields=[name])


def require_ints(config, *names: str, minimum: int = 1) -> None:
    """Each named field of `config` is an integer >= minimum (not a bool)."""
    for name in names:
        v = getattr(config, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ConfigError(f"{{0}} must be >= {minimum} (an integer), got {v!r}", fields=[name])


def require_choice(config, name: str, allowed: tuple) -> None:
    """The field `name` of `config` is one of `allowed`."""
    v = getattr(config, name)
    if v not in allowed:
        raise ConfigError(f"{{0}} must be one of {allowed}, got {v!r}", fields=[name])
