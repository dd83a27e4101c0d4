#!/usr/bin/env python
"""Per-device memory of one DiAD train step, from XLA's compiled memory analysis.

Lowers and compiles the sharded train step of diad_jax.train (the same `StepFactory` the trainer
uses) on ABSTRACT inputs -- `DiAD.abstract_params()` ShapeDtypeStructs carrying the partition
rules' shardings, never materialised -- on N forced host devices, and prints
`compiled.memory_analysis()` per device as a markdown table:

    peak = arguments + outputs - aliased (donated state) + temporaries

and the step's FLOPs on all devices (`train.perf.model_flops` of its jaxpr, what the training logs count),
with their shares by operation and operand dtypes.

XLA:CPU has one memory space, so it cannot analyse `--offload-optimizer-state` (AdamW's moments in
host memory between steps, brought to the device for the update). `--offload-state` adds an estimate
of that step's device peak from two analyses: the step's, less the moments (arguments live for the
whole program), and the AdamW update compiled alone (params, moments, gradients), whose device copies
of the moments are live only there:

    device peak ~ max(peak - moments, arguments + gradients + the update's temporaries)

It assumes the compiler brings the moments in for the update only, not during the gradient pass.

A step is one optimizer update on the global batch, computed as grad_accum micro-batches scanned
inside the step (diad_jax.train.StepFactory): the per-device micro-batch is global_batch /
(grad_accum x devices).

Examples:
  python benchmarks/bench_train_memory.py                      # SD size, remat 'blocks' + bf16, 1/2/8 devices
  python benchmarks/bench_train_memory.py --model tiny --devices 1 8 --remat none --dtype float32
  python benchmarks/bench_train_memory.py --cases 1:1:1:1:1 --remat none blocks dots convs_and_dots
  python benchmarks/bench_train_memory.py --cases 1:1:1:48:48 8:1:8:96:1  # devices:data:fsdp:global_batch:grad_accum
  python benchmarks/bench_train_memory.py --cases 1:1:1:48:48 --remat none --cache-latents --offload-state

Each device count runs in its own subprocess (the forced device count is fixed at JAX start-up).
On a CPU the numbers are XLA:CPU's buffer assignment; GPU/TPU compilers fuse differently, so treat
them as an estimate of what the sharding achieves (the parameter/optimizer part is exact).
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import platform
import subprocess
import sys
import time

from diad_jax.configs import REMAT_POLICIES

DEFAULT_CASES = [
    # devices, data, fsdp, global batch, micro-batches per step
    (1, 1, 1, 1, 1),
    (1, 1, 1, 48, 48),   # the reference's batch of 48 per update on ONE device, micro-batch 1
    (1, 1, 1, 48, 16),
    (2, 1, 2, 48, 24),
    (8, 1, 8, 96, 1),    # 12 per device
]


def parse_case(s: str) -> tuple[int, int, int, int, int]:
    try:
        d, data, fsdp, b, k = (int(x) for x in s.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"case {s!r}: expected devices:data:fsdp:global_batch:grad_accum, "
                                         f"e.g. 8:1:8:96:1")
    return d, data, fsdp, b, k


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd15", help="sd15 (default), tiny, or a ModelConfig JSON file")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="compute dtype")
    ap.add_argument("--remat", nargs="+", default=["blocks"], choices=REMAT_POLICIES,
                    help="rematerialisation policies (TrainConfig.remat), one row each (default: blocks)")
    ap.add_argument("--ema", action="store_true", help="keep an EMA of the trainable params")
    ap.add_argument("--cache-latents", action="store_true",
                    help="TrainConfig.cache_latents: the step reads posterior moments instead of running the VAE encoder")
    ap.add_argument("--cases", nargs="+", type=parse_case, default=None, metavar="D:DATA:FSDP:B:K",
                    help="devices:data:fsdp:global_batch:grad_accum (default: " +
                         " ".join(":".join(map(str, c)) for c in DEFAULT_CASES) + ")")
    ap.add_argument("--devices", nargs="+", type=int, default=None,
                    help="only the default cases with these device counts")
    ap.add_argument("--offload-state", action="store_true",
                    help="also estimate the device peak with AdamW's moments in host memory between steps "
                         "(TrainConfig.optimizer.offload_state; see above)")
    ap.add_argument("--conv-impl", default="lax", choices=["lax", "auto", "im2col"],
                    help="convolution kernel (DiAD's conv_impl): 'lax' (default) is what GPU/TPU run; "
                         "'auto' is the CPU backend's im2col for small maps")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per device count")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    return ap


def per_device_bytes(abstract_tree, shardings) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs placed with `shardings`."""
    import math

    import jax

    return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
               for x, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)))


def offloaded_device_peak(factory, step_memory) -> dict:
    """The estimate `--offload-state` adds (module docstring): the moments' per-device bytes, the
    AdamW update's own temporaries (it is compiled alone on the factory's shardings, params and
    moments donated as in the step) and the device peak with the moments in host memory."""
    import jax
    import optax

    from diad_jax import sharding as shd

    def update(params, opt_state, grads):
        updates, opt_state = factory.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = shd.with_shardings(factory.abstract_trainable, factory.trainable_shardings)
    opt_state = shd.with_shardings(factory.abstract_state.opt_state, factory.opt_state_device_shardings)
    update_memory = jax.jit(update, donate_argnums=(0, 1)).lower(params, opt_state, params).compile().memory_analysis()
    moments = per_device_bytes(factory.abstract_state.opt_state, factory.opt_state_device_shardings)
    gradients = per_device_bytes(factory.abstract_trainable, factory.trainable_shardings)
    step_peak = (step_memory.argument_size_in_bytes + step_memory.output_size_in_bytes
                 - step_memory.alias_size_in_bytes + step_memory.temp_size_in_bytes)
    during_update = step_memory.argument_size_in_bytes + gradients + update_memory.temp_size_in_bytes
    return dict(moments=moments, update_temp=update_memory.temp_size_in_bytes,
                offloaded_peak=max(step_peak - moments, during_update))


def worker(args) -> None:
    """Runs in a subprocess with the forced device count already in XLA_FLAGS."""
    import jax

    from diad_jax import sharding as shd
    from diad_jax.configs import ModelConfig, TrainConfig
    from diad_jax.models.diad import DTYPES, DiAD
    from diad_jax.train import StepFactory
    from diad_jax.train.perf import matrix_ops

    cases = [parse_case(c) for c in args._worker.split(",")]
    config = ModelConfig.from_spec(args.model)
    dtype = DTYPES[args.dtype]
    rows = []
    for (devices, data, fsdp, batch, accum), remat in itertools.product(cases, args.remat):
        tcfg = TrainConfig(model=args.model, compute_dtype=args.dtype, remat=remat,
                           cache_latents=args.cache_latents).replace(**{
            "data.batch_size": batch, "optimizer.grad_accum": accum, "mesh.data": data, "mesh.fsdp": fsdp,
            "optimizer.ema_decay": 0.999 if args.ema else None})
        mesh = shd.make_mesh(data, fsdp, jax.devices()[:devices])
        t0 = time.perf_counter()
        factory = StepFactory(DiAD(config, dtype=dtype, remat=tcfg.remat, conv_impl=args.conv_impl), tcfg, mesh)
        traced = factory.trace(batch)
        lowered = traced.lower()
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        ma = compiled.memory_analysis()
        flops_by_op = collections.Counter()
        for name, dtypes, flops in matrix_ops(traced.jaxpr):
            flops_by_op[f"{name} {' x '.join(dtypes)}"] += flops
        peak = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes
        state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(factory.abstract_state))
        frozen_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(factory.abstract_frozen))
        rows.append(dict(devices=devices, data=data, fsdp=fsdp, batch=batch, grad_accum=accum, remat=remat,
                         per_device_micro_batch=batch / (data * fsdp * accum),
                         arguments=ma.argument_size_in_bytes, outputs=ma.output_size_in_bytes,
                         aliased=ma.alias_size_in_bytes, temp=ma.temp_size_in_bytes, peak=peak,
                         state_total=state_bytes, frozen_total=frozen_bytes,
                         lower_s=t1 - t0, compile_s=t2 - t1, tflops=sum(flops_by_op.values()) / 1e12,
                         flops_by_op=dict(flops_by_op.most_common())))
        if args.offload_state:
            rows[-1].update(offloaded_device_peak(factory, ma))
        print("ROW " + json.dumps(rows[-1]), flush=True)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args._worker:
        worker(args)
        return
    cases = args.cases or [c for c in DEFAULT_CASES if args.devices is None or c[0] in args.devices]
    by_devices: dict[int, list] = {}
    for c in cases:
        if c[1] * c[2] != c[0]:
            raise SystemExit(f"case {c}: data x fsdp must equal the device count")
        if c[3] % (c[0] * c[4]):
            raise SystemExit(f"case {c}: the global batch must be a multiple of devices x grad_accum")
        by_devices.setdefault(c[0], []).append(c)
    rows = []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for n, cs in sorted(by_devices.items()):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
                   PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--dtype", args.dtype,
               "--conv-impl", args.conv_impl, "--remat", *args.remat,
               "--_worker", ",".join(":".join(map(str, c)) for c in cs)]
        if args.ema:
            cmd.append("--ema")
        if args.cache_latents:
            cmd.append("--cache-latents")
        if args.offload_state:
            cmd.append("--offload-state")
        print(f"# {n} device(s): compiling {len(cs)} case(s) ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        got = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"worker for {n} devices failed (exit {proc.returncode})")
        rows += got

    import jax
    import flax
    import optax

    gib = 2 ** 30
    print(f"Train-step memory per device (XLA memory_analysis), model={args.model}, compute {args.dtype}, "
          f"fp32 master weights, AdamW state sharded over fsdp, conv={args.conv_impl}, "
          f"{'cached latents' if args.cache_latents else 'VAE encoder in the step'}\n")
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
          f"{platform.system()} {platform.release()}; python {platform.python_version()}, jax {jax.__version__}, "
          f"flax {flax.__version__}, optax {optax.__version__}; forced host (CPU) devices\n")
    print("| devices | mesh (data x fsdp) | global batch | micro-batches | remat | per-device micro-batch "
          "| arguments GiB | outputs GiB | aliased GiB | temp GiB | **peak GiB** | peak GB | TFLOP / step | compile s |")
    print("|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['devices']} | {r['data']} x {r['fsdp']} | {r['batch']} | {r['grad_accum']} | {r['remat']} "
              f"| {r['per_device_micro_batch']:g} | {r['arguments'] / gib:.2f} | {r['outputs'] / gib:.2f} | {r['aliased'] / gib:.2f} "
              f"| {r['temp'] / gib:.2f} | **{r['peak'] / gib:.2f}** | {r['peak'] / 1e9:.1f} | {r['tflops']:.3g} "
              f"| {r['compile_s']:.0f} |")
    print("\nMatrix FLOPs by operation and operand dtypes:\n")
    for r in rows:
        total = sum(r["flops_by_op"].values())
        print(f"- {r['devices']} device(s), {r['grad_accum']} x {r['batch'] // r['grad_accum']}, {r['remat']}: "
              + ", ".join(f"{op} {100 * f / total:.1f}%" for op, f in r["flops_by_op"].items()))
    if args.offload_state:
        print("\nAdamW's moments in host memory between steps (`--offload-optimizer-state`), estimated as the "
              "module docstring says:\n")
        print("| devices | global batch | micro-batches | remat | moments per device GiB | the update's temp GiB "
              "| **device peak GiB** | device peak GB |")
        print("|---:|---:|---:|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['devices']} | {r['batch']} | {r['grad_accum']} | {r['remat']} | {r['moments'] / gib:.2f} "
                  f"| {r['update_temp'] / gib:.2f} | **{r['offloaded_peak'] / gib:.2f}** "
                  f"| {r['offloaded_peak'] / 1e9:.1f} |")
    if rows:
        r = rows[0]
        print(f"\nTrain state (trainable params + optimizer state{' + EMA' if args.ema else ''}), all devices: "
              f"{r['state_total'] / gib:.2f} GiB; frozen params (UNet encoder/middle, VAE): "
              f"{r['frozen_total'] / gib:.2f} GiB.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
