#!/usr/bin/env python
"""Train-step throughput of diad_jax.train on this machine (the real jitted, sharded step).

Examples:
  python benchmarks/bench_train_step.py                              # tiny, batch 8, fp32 and bf16
  python benchmarks/bench_train_step.py --model sd15 --batch 1 --dtype bfloat16 --remat --grads-only

--grads-only times the loss + gradient of the trainable params without the optimizer (for a
machine whose memory cannot hold SD-size AdamW state: about 11 GiB of fp32 params + moments);
the AdamW update it leaves out is elementwise over the trainable params.
Random images (normalised range), fresh reference-style init, one process, `--devices` forced
host devices when on CPU. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny (default), sd15, or a ModelConfig JSON file")
    ap.add_argument("--batch", type=int, default=8, help="global batch")
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20, help="timed steps (after one warm-up/compile step)")
    ap.add_argument("--grads-only", action="store_true", help="time loss + gradients only (no optimizer state)")
    ap.add_argument("--mesh-data", type=int, default=-1)
    ap.add_argument("--mesh-fsdp", type=int, default=1)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from diad_jax import sharding as shd
    from diad_jax.configs import TrainConfig
    from diad_jax.models.diad import DiAD
    from diad_jax.checkpoints import default_context
    from diad_jax.train import StepFactory, resolve_model_config

    config = resolve_model_config(args.model)
    mesh = shd.make_mesh(args.mesh_data, args.mesh_fsdp)
    rows = []
    params_host = None
    for dt in args.dtype:
        cfg = TrainConfig(model=args.model, batch_size=args.batch, grad_accum=args.grad_accum, compute_dtype=dt,
                          remat=args.remat, mesh_data=args.mesh_data, mesh_fsdp=args.mesh_fsdp)
        model = DiAD(config, dtype=jnp.bfloat16 if dt == "bfloat16" else jnp.float32, remat=args.remat)
        f = StepFactory(model, cfg, mesh)
        if params_host is None:
            t0 = time.perf_counter()
            params_host = jax.device_get(model.init(seed=0))
            print(f"# init {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        trainable, frozen = f.split(params_host)
        context = f.place_context(default_context(config))
        rng = np.random.default_rng(0)
        batch = shd.shard_batch({"image": rng.standard_normal((args.batch, 3, config.image_size, config.image_size),
                                                              np.float32),
                                 "index": np.arange(args.batch)}, mesh)
        if args.grads_only:
            key = jax.random.PRNGKey(0)
            grad_fn = jax.jit(jax.value_and_grad(lambda p, fr, c, b: f.loss(p, fr, c, b, key)))
            run = lambda: grad_fn(trainable, frozen, context, batch)  # noqa: E731
        else:
            state = [f.init_state(trainable)]

            def run():
                state[0], m = f.step(state[0], frozen, context, batch)
                return m
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.steps):
            out = run()
        jax.block_until_ready(out)
        dt_step = (time.perf_counter() - t0) / args.steps
        rows.append((dt, first, dt_step, args.batch / dt_step))
        print(f"# {dt}: first call {first:.1f}s, {dt_step:.3f}s/step", file=sys.stderr, flush=True)
        del trainable, frozen, run

    print(f"Train step ({'loss + grads only' if args.grads_only else 'full AdamW step'}), model={args.model}, "
          f"batch {args.batch}, remat={'on' if args.remat else 'off'}, grad_accum={args.grad_accum}, "
          f"mesh {dict(mesh.shape)}\n")
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, {jax.devices()[0].device_kind} x "
          f"{jax.device_count()}; jax {jax.__version__}\n")
    print("| compute dtype | first call (compile + run) s | s / step | images / s |")
    print("|---|---:|---:|---:|")
    for dt, first, step, ips in rows:
        print(f"| {dt} | {first:.1f} | {step:.3f} | {ips:.1f} |")


if __name__ == "__main__":
    main()
