"""sharding.place across processes: two processes (jax.distributed on 127.0.0.1, gloo), one CPU
device each, form one 2-device mesh, as in design.md."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import xla_flags

ROOT = Path(__file__).resolve().parents[1]

# Run in each process: place two trees of the same layout (leaves spanning both processes) onto new
# shardings, counting the XLA compilations of those two calls; print the count and the values.
PLACE_TWICE = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from diad_jax import sharding as shd

compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration"
    else None)
mesh = shd.make_mesh(2, 1)
rows, rep = NamedSharding(mesh, P("data")), shd.replicated(mesh)
trees = [shd.place({"a": np.full((4, 3), v, np.float32), "b": np.arange(4.0) + v}, {"a": rows, "b": rep})
         for v in (1.0, 2.0)]
before = len(compiles)
placed = [shd.place(t, {"a": rep, "b": rows}) for t in trees]
n_compiles = len(compiles) - before
print(json.dumps({"compiles": n_compiles, "shardings": [p["a"].sharding == rep and p["b"].sharding == rows
                                                        for p in placed],
                  "a": [np.asarray(p["a"].addressable_data(0)).tolist() for p in placed],
                  "b": [np.asarray(p["b"].addressable_data(0)).tolist() for p in placed]}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_place_across_processes_compiles_once_per_layout():
    """Two same-layout trees of jax.Arrays spanning both processes are resharded by one compiled
    identity (the second placement reuses the first's program), onto the shardings asked for."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1),
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="3")
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", PLACE_TWICE, coordinator, str(i)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = []
    for i, p in enumerate(procs):
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, f"process {i}: exit {p.returncode}\n{err[-4000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    for i, r in enumerate(results):
        assert r["compiles"] == 1, r
        assert r["shardings"] == [True, True]
        assert r["a"] == [[[1.0] * 3] * 4, [[2.0] * 3] * 4]  # replicated: each process holds all 4 rows
        assert r["b"] == [[2 * i + 1.0, 2 * i + 2.0], [2 * i + 2.0, 2 * i + 3.0]]  # its 2 rows of arange(4) + v
