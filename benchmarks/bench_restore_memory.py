#!/usr/bin/env python
"""Peak host memory of one process restoring an SD-size model checkpoint onto a mesh.

Writes (once, into --dir) a model checkpoint of the SD-size DiAD with random weights, then, each
in a fresh process on N forced CPU devices with a data=1 x fsdp=N mesh, restores it two ways and
prints the process's peak RSS (ru_maxrss) and wall time as a markdown table:

  placed     `checkpoints.load_model(path, mesh)`: every array read by orbax straight onto the
             partition rules' shardings (what `diad_jax.load` and `--init-checkpoint` do now)
  host-copy  the path --init-checkpoint took before: orbax restores the whole tree without target
             shardings as host numpy, then `sharding.place` copies it onto the same shardings

On CPU the devices' buffers are host memory too, so both peaks include the placed params (about
the checkpoint's size); the difference is the full host copy.

  python benchmarks/bench_restore_memory.py --dir /tmp/sd15_ckpt        # fsdp=8, both ways
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(path: Path, seed: int = 0) -> None:
    import jax
    import numpy as np

    from diad_jax.checkpoints import default_context, save_model
    from diad_jax.configs import ModelConfig
    from diad_jax.models.diad import DiAD

    config = ModelConfig.sd15()
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: (0.02 * rng.standard_normal(x.shape, np.float32)).astype(x.dtype),
                          DiAD(config).abstract_params())
    save_model(path, config=config, params=params, context=default_context(config), kind="init",
               metadata={"source": "bench"})


def measure(path: str, mode: str, fsdp: int) -> dict:
    """Runs in the child process: restore, block until every array is placed, report."""
    import jax

    from diad_jax import sharding as shd

    mesh = shd.make_mesh(1, fsdp)
    t0 = time.perf_counter()
    if mode == "placed":
        from diad_jax.checkpoints import load_model

        params = load_model(path, mesh).params
    else:
        import orbax.checkpoint as ocp

        restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
            path, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        host = restored["state"]["params"]
        params = shd.place(host, shd.param_shardings(host, mesh))
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    n = sum(x.size for x in jax.tree.leaves(params))
    sharded = sum(x.size for x in jax.tree.leaves(params) if not x.sharding.is_fully_replicated)
    return {"mode": mode, "seconds": seconds, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "params": n, "sharded_fraction": sharded / n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True, help="where the SD-size checkpoint is (written if absent)")
    ap.add_argument("--fsdp", type=int, default=8, help="forced CPU devices = the fsdp axis (default 8)")
    ap.add_argument("--modes", nargs="+", default=["placed", "host-copy"], choices=["placed", "host-copy"])
    ap.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child[1], args.child[0], args.fsdp)))
        return 0
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={args.fsdp}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    if args.make:
        make_checkpoint(args.dir)
        return 0
    if not (args.dir / "model_config").exists():
        # in a child too: Linux keeps a process's peak RSS across fork + exec, so this process must stay small
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--make"], env=env, check=True)
        print(f"wrote {args.dir} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    size = sum(f.stat().st_size for f in args.dir.rglob("*") if f.is_file())
    rows = []
    for mode in args.modes:
        out = subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--fsdp", str(args.fsdp), "--child",
                              mode, str(args.dir)], env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    import jax
    import orbax.checkpoint

    parent_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert parent_peak < 2, f"the measuring process itself peaked at {parent_peak:.1f} GiB"
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; Python {platform.python_version()}, "
          f"jax {jax.__version__}, orbax-checkpoint {orbax.checkpoint.__version__}; checkpoint {size / 2**30:.2f} GiB "
          f"on disk; {args.fsdp} forced CPU devices, mesh data=1 x fsdp={args.fsdp}\n")
    print("| restore | peak RSS (GiB) | peak / checkpoint size | wall s | params | fraction of params sharded |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['peak_rss_gib']:.2f} | {r['peak_rss_gib'] * 2**30 / size:.2f}x | "
              f"{r['seconds']:.1f} | {r['params'] / 1e9:.2f} B | {r['sharded_fraction']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
