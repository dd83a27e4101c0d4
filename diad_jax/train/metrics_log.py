"""Training metrics: JSON lines (<workdir>/metrics.jsonl) and TensorBoard event files."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax


class MetricWriter:
    """Scalars to <workdir>/metrics.jsonl and TensorBoard event files (<workdir>/tensorboard);
    only process 0 writes."""

    def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.jsonl = None
        self.tb = None
        if self.active:
            Path(workdir).mkdir(parents=True, exist_ok=True)
            self.jsonl = open(Path(workdir) / "metrics.jsonl", "a")
            if tensorboard:
                # imported here: tensorboardX imports torch wherever torch is installed (1.6 s here),
                # which the processes that write no events (all but process 0) need not pay
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, scalars: dict[str, float], kind: str = "train") -> None:
        if not self.active:
            return
        rec = {"step": int(step), "kind": kind, "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
        self.jsonl.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{kind}/{k}", float(v), int(step))

    def flush(self):
        if self.jsonl is not None:
            self.jsonl.flush()
        if self.tb is not None:
            self.tb.flush()

    def close(self):
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | os.PathLike, kind: str = "train") -> list[dict]:
    """The records of one kind from a metrics.jsonl file, in file order."""
    out = []
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("kind") == kind:
                out.append(rec)
    return out
