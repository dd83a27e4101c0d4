"""Reading PyTorch checkpoints (.ckpt/.pt/.pth/.bin pickles, .safetensors) with clear errors.

The format is told by the file's first bytes, not its suffix. PyTorch checkpoints (torch.save's
zip, or a legacy pickle) are read with `torch.load(weights_only=True)` (no arbitrary code) into a
plain dict, so a conversion that consumes it (`ldm_to_params(consume=True)`) frees each tensor as
it goes; .safetensors files are read tensor by tensor on access. A Lightning checkpoint's
`state_dict` entry is unwrapped. Tensors keep the dtype they are stored in (the conversion checks
and casts it). torch is only needed here (the `convert` extra).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

from diad_jax.errors import UserError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)


class CheckpointReadError(UserError):
    """A file that cannot be read as a state dict; the message names the file."""


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}


class LazySafetensors(Mapping):
    """Read-on-access view of a .safetensors file: one tensor in memory at a time, read with
    plain file reads (no memory map, so converted tensors do not keep file pages resident).
    Values are numpy arrays of the stored dtype (bf16 as ml_dtypes.bfloat16). `read_state_dict`
    has checked that the file starts like one (an 8-byte header length, then '{')."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int(np.frombuffer(f.read(8), "<u8")[0])
            if n <= 0 or 8 + n > size:
                raise CheckpointReadError(f"{path}: not a readable .safetensors file (bad header length {n})")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise CheckpointReadError(f"{path}: not a readable .safetensors file (header: {e})") from e
        header.pop("__metadata__", None)
        self._base = 8 + n
        self._info = {}
        for k, v in header.items():
            begin, end = v.get("data_offsets", (0, -1))
            if v.get("dtype") not in _ST_DTYPES or self._base + end > size or end < begin:
                raise CheckpointReadError(f"{path}: tensor {k!r} has a bad entry {v}")
            self._info[k] = (v["dtype"], tuple(v["shape"]), begin, end)
        self._keys = list(self._info)

    def __getitem__(self, key):
        dtype, shape, begin, end = self._info[key]
        with open(self.path, "rb") as f:
            f.seek(self._base + begin)
            buf = f.read(end - begin)
        return np.frombuffer(buf, _ST_DTYPES[dtype]).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def pop(self, key):
        value = self[key]
        self._keys.remove(key)
        del self._info[key]
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


def _file_format(path: Path) -> str:
    """'safetensors', 'zip' (torch.save's format) or 'pickle' (torch's legacy one), told by the
    file's first bytes; CheckpointReadError for a file that is none of them."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{" and head[4:8] == bytes(4):  # a header length (under 4 GiB), then the JSON header
        return "safetensors"
    if head.startswith(b"PK"):
        return "zip"
    if head.startswith(b"\x80"):  # the PROTO opcode every pickle torch writes starts with
        return "pickle"
    size = path.stat().st_size
    raise CheckpointReadError(f"{path}: not a PyTorch checkpoint (zip or pickle) nor a safetensors file: "
                              + (f"{size} bytes, starting {head[:8].hex(' ')}" if size else "the file is empty"))


def read_state_dict(path: str | Path, unsafe_pickle: bool = False) -> Mapping[str, Any]:
    """A checkpoint file -> mapping of parameter name to tensor."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointReadError(f"{path}: is a directory; expected a .ckpt/.pt/.pth/.bin or .safetensors file")
    suffix = path.suffix.lower()
    if suffix not in PICKLE_SUFFIXES + SAFETENSORS_SUFFIXES:
        raise CheckpointReadError(f"{path}: unsupported file type {suffix!r}; expected one of "
                                  f"{', '.join(PICKLE_SUFFIXES + SAFETENSORS_SUFFIXES)}")
    if _file_format(path) == "safetensors":
        return LazySafetensors(path)
    try:
        import torch
    except ImportError as e:
        raise CheckpointReadError(f"{path}: reading a PyTorch pickle needs torch: pip install 'diad-jax[convert]' "
                                  f"(or convert the file to .safetensors)") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=not unsafe_pickle)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = ""
        if "weights_only" in str(e) or "Weights only load failed" in str(e):
            hint = (" The file holds Python objects besides tensors; if you trust its origin, load it with full "
                    "unpickling ({0}).")
        raise CheckpointReadError(f"{path}: not a readable PyTorch checkpoint ({msg}).{hint}",
                                  fields=["unsafe_pickle=True"] if hint else []) from e
    return unwrap_state_dict(obj, path)
