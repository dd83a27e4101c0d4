"""Reading PyTorch checkpoints (.ckpt/.pt/.pth/.bin pickles, .safetensors) with clear errors.

Pickles are read with `torch.load(weights_only=True)` (no arbitrary code) into a plain dict, so
a conversion that consumes it (`ldm_to_params(consume=True)`) frees each tensor as it goes;
.safetensors files are read tensor by tensor on access. A Lightning checkpoint's `state_dict`
entry is unwrapped. torch is only needed here (the `convert` extra).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Mapping

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)


class CheckpointReadError(ValueError):
    """A file that cannot be read as a state dict; the message names the file."""


class LazySafetensors(Mapping):
    """Read-on-access view of a .safetensors file (one tensor in memory at a time)."""

    def __init__(self, path: Path):
        from safetensors import safe_open
        self.path = path
        try:
            import torch  # noqa: F401
            framework = "pt"  # handles bf16, which numpy cannot
        except ImportError:  # pragma: no cover - torch is in the convert extra
            framework = "np"
        self._f = safe_open(str(path), framework=framework)
        self._keys = list(self._f.keys())

    def __getitem__(self, key):
        return self._f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def pop(self, key):
        value = self._f.get_tensor(key)
        self._keys.remove(key)
        return value


def _is_tensor(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def unwrap_state_dict(obj: Any, path: Path) -> Mapping[str, Any]:
    """Lightning/ldm checkpoints nest the weights under `state_dict`; accept both."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, Mapping) and not isinstance(obj, dict):
        obj = dict(obj)
    if not isinstance(obj, Mapping):
        raise CheckpointReadError(f"{path}: holds a {type(obj).__name__}, not a state dict (a mapping of "
                                  f"parameter names to tensors)")
    bad = [k for k, v in obj.items() if not _is_tensor(v)]
    if bad:
        raise CheckpointReadError(f"{path}: {len(bad)} entries are not tensors, e.g. {bad[:5]}; expected a "
                                  f"state dict (or a Lightning checkpoint with a 'state_dict' entry)")
    return obj


def read_state_dict(path: str | Path, unsafe_pickle: bool = False) -> Mapping[str, Any]:
    """A checkpoint file -> mapping of parameter name to tensor."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointReadError(f"{path}: is a directory; expected a .ckpt/.pt/.pth/.bin or .safetensors file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        try:
            return LazySafetensors(path)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointReadError(f"{path}: not a readable .safetensors file ({e})") from e
    if suffix not in PICKLE_SUFFIXES:
        raise CheckpointReadError(f"{path}: unsupported file type {suffix!r}; expected one of "
                                  f"{', '.join(PICKLE_SUFFIXES + SAFETENSORS_SUFFIXES)}")
    try:
        import torch
    except ImportError as e:  # pragma: no cover
        raise ImportError("reading PyTorch checkpoints needs torch: pip install 'diad-jax[convert]'") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=not unsafe_pickle)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = ""
        if "weights_only" in str(e) or "Weights only load failed" in str(e):
            hint = (" The file holds Python objects besides tensors; if you trust its origin, pass "
                    "--unsafe-pickle to load it with full unpickling.")
        raise CheckpointReadError(f"{path}: not a readable PyTorch checkpoint ({msg}).{hint}") from e
    return unwrap_state_dict(obj, path)
