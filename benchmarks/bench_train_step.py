#!/usr/bin/env python
"""Train-step throughput of diad_jax.train on this machine (the real jitted, sharded step).

Examples:
  python benchmarks/bench_train_step.py                              # tiny, batch 8, fp32 and bf16
  python benchmarks/bench_train_step.py --model sd15 --batch 1 --dtype bfloat16 --remat blocks --grads-only
  # the first SD-size training step on a GPU (H200, 2026-12-04; benchmarks/RESULTS.md): the reference
  # preset's optimiser, bf16, cached latents, cuDNN's attention against XLA's
  PYTHONPATH=. python3 benchmarks/bench_train_step.py --preset reference --model sd15 --dtype bfloat16 \
      --remat none --cache-latents on --attention cudnn xla --batch 8 --steps 10
  # the reference recipe (48 per update, micro-batches of 1) on ONE 24 GB GPU: AdamW's moments on the
  # device, then in host memory (XLA:CPU's analysis cannot tell the two apart)
  PYTHONPATH=. python3 benchmarks/bench_train_step.py --preset reference --model sd15 --dtype bfloat16 \
      --remat none --cache-latents on --batch 48 --grad-accum 48 --offload-state both --steps 3

The peak device memory column is `device.memory_stats()["peak_bytes_in_use"]` of the first device
(a running maximum over the process, so give the batches in ascending order); CPUs report none.
TFLOP/step is what the training logs count (`StepFactory.flops_per_step`: the matrix work in the
step's jaxpr); MFU is against the device's dense bf16 peak (train/perf.py's table, or --peak-tflops).
A row whose step fails (memory, a kernel's limits) says why and the next row runs.

--grads-only times the loss + gradient of the trainable params without the optimizer (for a
machine whose memory cannot hold SD-size AdamW state: about 11 GiB of fp32 params + moments);
the AdamW update it leaves out is elementwise over the trainable params.
Random images (normalised range), fresh reference-style init, one process on the machine's devices
(`--mesh-data` / `--mesh-fsdp` lay them out). Prints a markdown table.

--torch adds the PyTorch baseline, run after ours in the same process with the same weights: the
reference's training step (sgn.py / ldm ddpm.py p_losses) on diffusers' PyTorch ControlNet + the SFF
block + UNet2DConditionModel + AutoencoderKL (tests/oracle.py), same trainable subset (ControlNet,
SFF convs, UNet up blocks and output layers), torch.optim.AdamW, fp32, same batch; with
--grads-only it times loss + backward only, like ours.
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import time

from diad_jax.configs import REMAT_POLICIES


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["default", "reference"], default="default",
                    help="the TrainConfig the step is built from: TrainConfig() or TrainConfig.reference() (AdamW "
                         "1e-5, weight decay 0.01); --grad-accum, the dtype and the batch still apply")
    ap.add_argument("--model", default="tiny", help="tiny (default), sd15, or a ModelConfig JSON file")
    ap.add_argument("--batch", type=int, nargs="+", default=[8], help="global batch(es), one row each")
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--remat", default="none", choices=REMAT_POLICIES, help="TrainConfig.remat (default: none)")
    ap.add_argument("--grad-accum", type=int, nargs="+", default=[1],
                    help="optimizer.grad_accum: micro-batches scanned inside each step; several values: a row each")
    ap.add_argument("--cache-latents", choices=["off", "on", "both"], default="off",
                    help="TrainConfig.cache_latents: the step reads the images' VAE posterior moments (computed "
                         "here once) instead of encoding them; 'both': a row each, cached first")
    ap.add_argument("--attention", nargs="+", default=["default"], choices=["default", "xla", "cudnn"],
                    help="eval.attention, the model's one attention setting (default: XLA's choice; cudnn: fused "
                         "attention on NVIDIA GPUs, bf16 only); several values: a row each")
    ap.add_argument("--offload-state", choices=["off", "on", "both"], default="off",
                    help="TrainConfig.optimizer.offload_state: AdamW's moments in host memory between steps; 'both': "
                         "a row each, the offloaded one first (the peak column is a running maximum)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (after one warm-up/compile step)")
    ap.add_argument("--peak-tflops", type=float, help="the device's peak for the MFU column (default: "
                    "train/perf.py's table by device kind; a CPU has none)")
    ap.add_argument("--grads-only", action="store_true", help="time loss + gradients only (no optimizer state)")
    ap.add_argument("--mesh-data", type=int, default=-1)
    ap.add_argument("--mesh-fsdp", type=int, default=1)
    ap.add_argument("--torch", action="store_true", help="also time the PyTorch baseline (needs the dev extra)")
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    if args.torch:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import jax

    from diad_jax import sharding as shd
    from diad_jax.configs import ModelConfig, TrainConfig
    from diad_jax.models.diad import DTYPES, DiAD
    from diad_jax.train.perf import peak_tflops

    config = ModelConfig.from_spec(args.model)
    mesh = shd.make_mesh(args.mesh_data, args.mesh_fsdp)
    base = TrainConfig.reference() if args.preset == "reference" else TrainConfig()
    t0 = time.perf_counter()
    if args.torch:  # the same random weights in both: an ldm state dict converted for us
        from tests import oracle
        from diad_jax.convert.ldm import ldm_to_params
        ldm_sd = oracle.random_ldm_state_dict(config, seed=0)
        params_host, _ = ldm_to_params(ldm_sd, DiAD(config).abstract_params())
    else:
        params_host = jax.device_get(DiAD(config).init(seed=0))
    print(f"# init {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    peak = args.peak_tflops or peak_tflops(jax.devices()[0])
    cached = {"off": [False], "on": [True], "both": [True, False]}[args.cache_latents]
    offloaded = {"off": [False], "on": [True], "both": [True, False]}[args.offload_state]
    rows = []  # (label, batch, first call s, s/step, images/s, TFLOP/step, MFU, peak device bytes, error)
    for dt, batch_size, grad_accum, cache_latents, offload, attention in itertools.product(
            args.dtype, args.batch, args.grad_accum, cached, offloaded, args.attention):
        attention = None if attention == "default" else attention
        cfg = base.replace(model=args.model, compute_dtype=dt, remat=args.remat, cache_latents=cache_latents, **{
            "data.batch_size": batch_size, "optimizer.grad_accum": grad_accum, "mesh.data": args.mesh_data,
            "mesh.fsdp": args.mesh_fsdp, "optimizer.offload_state": offload, "eval.attention": attention})
        label = (f"{dt}{f', {grad_accum} micro-batches' if len(args.grad_accum) > 1 else ''}"
                 f"{', cached latents' if cache_latents else ''}{', moments in host memory' if offload else ''}"
                 f"{f', {attention} attention' if attention else ''}")
        t0 = time.perf_counter()
        try:
            first, per_step, flops = time_step(args, DiAD(config, dtype=DTYPES[dt], remat=cfg.remat,
                                                          attention=attention), cfg, mesh, params_host)
        except Exception as e:  # a configuration the device cannot run (memory, a kernel's limits): say so, go on
            rows.append((label, batch_size, time.perf_counter() - t0, None, None, None, None, None,
                         f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"))
        else:
            tflops = flops / per_step / mesh.devices.size / 1e12
            stats = jax.local_devices()[0].memory_stats() or {}
            rows.append((label, batch_size, first, per_step, batch_size / per_step, flops / 1e12,
                         tflops / peak if peak else None, stats.get("peak_bytes_in_use"), None))
        print("# " + " | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    if args.torch:
        del params_host
        import gc
        gc.collect()
        first, per_step = torch_baseline(config, ldm_sd, args, args.batch[0])
        rows.append((f"PyTorch {__import__('torch').__version__} float32", args.batch[0], first, per_step,
                     args.batch[0] / per_step, None, None, None, None))

    print(f"Train step ({'loss + grads only' if args.grads_only else 'full AdamW step'}), model={args.model}, "
          f"preset {args.preset}, remat {args.remat}, mesh {dict(mesh.shape)}\n")
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, {jax.devices()[0].device_kind} x "
          f"{jax.device_count()}; jax {jax.__version__}; MFU against {peak} TFLOP/s per device\n")
    print("| compute dtype, micro-batches, latents, optimizer state, attention | batch | first call (compile + run) s "
          "| s / step | images / s | TFLOP / step | MFU | peak device memory GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, b, first, per_step, ips, tflop, mfu, peak_bytes, error in rows:
        if error:
            print(f"| {label} | {b} | {first:.1f} | failed: {error} | | | | |")
            continue
        print(f"| {label} | {b} | {first:.1f} | {per_step:.3f} | {ips:.1f} | {_fmt(tflop, '.3g')} | "
              f"{_fmt(mfu, '.1%')} | {_fmt(peak_bytes and peak_bytes / 2**30, '.1f')} |")
    if args.torch:
        ref = rows[-1][3]
        print("\n" + ", ".join(f"{label}: {ref / per_step:.2f}x PyTorch's images/s"
                               for label, b, _, per_step, *_ in rows[:-1] if b == args.batch[0] and per_step))


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def time_step(args, model, cfg, mesh, params_host) -> tuple[float, float, float]:
    """(first call s, s per step, FLOPs per step) of the train step built from `cfg` (or its loss +
    gradients with --grads-only) on random images."""
    import jax
    import numpy as np

    from diad_jax import sharding as shd
    from diad_jax.checkpoints import default_context
    from diad_jax.train import StepFactory
    from diad_jax.train.perf import model_flops

    config, batch_size = model.config, cfg.data.batch_size
    f = StepFactory(model, cfg, mesh)
    trainable, frozen = f.split(params_host)
    context = f.place_context(default_context(config))
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch_size, 3, config.image_size, config.image_size), np.float32)
    fields = {"image": images, "index": np.arange(batch_size)}
    if cfg.cache_latents:  # what the cache holds for these images (train/latents.py)
        fields["moments"] = np.stack(jax.jit(model.encode_moments)(params_host, images), axis=1)
    batch = shd.shard_batch(fields, mesh)
    if args.grads_only:
        key = jax.random.PRNGKey(0)
        grad_fn = jax.jit(jax.value_and_grad(lambda p, fr, c, b: f.loss(p, fr, c, b, key)))
        flops = model_flops(jax.make_jaxpr(grad_fn)(trainable, frozen, context, batch))
        run = lambda: grad_fn(trainable, frozen, context, batch)  # noqa: E731
    else:
        state = [f.init_state(trainable)]
        flops = f.flops_per_step(state[0], frozen, context, batch_size)

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
    return first, (time.perf_counter() - t0) / args.steps, flops


def torch_baseline(config, ldm_sd, args, batch_size: int):
    """(first step s, s/step) of the reference's train step in PyTorch (see the module docstring)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from tests.torch_reference import TorchDiAD

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    torch.set_grad_enabled(True)  # tests/oracle.py turns autograd off for the parity tests
    ref = TorchDiAD(config, ldm_sd)
    for m in (ref.controlnet, ref.unet):
        m.train()
        m.requires_grad_(False)
    ref.vae.requires_grad_(False)
    # the SFF convs as trainable tensors (oracle.torch_sff reads them from the state dict)
    sff = {k: torch.nn.Parameter(torch.from_numpy(np.array(v))) for k, v in ldm_sd.items()
           if k.startswith("control_model.down") and k.endswith(".0.weight")}
    ref.sd = {**ldm_sd, **sff}
    u = ref.unet
    trainable = list(ref.controlnet.parameters()) + list(u.up_blocks.parameters()) + \
        list(u.conv_norm_out.parameters()) + list(u.conv_out.parameters())
    for p in trainable:
        p.requires_grad_(True)
    trainable += list(sff.values())
    opt = None if args.grads_only else torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.01)
    acp = torch.tensor(np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2), dtype=torch.float32)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((batch_size, 3, config.image_size, config.image_size), np.float32))
    ctx = torch.zeros(batch_size, config.context_len, config.unet.context_dim)

    def step():
        with torch.no_grad():
            dist = ref.vae.encode(x).latent_dist
            z = config.scale_factor * dist.sample()
        t = torch.randint(0, 1000, (batch_size,))
        noise = torch.randn_like(z)
        a = acp[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * z + (1 - a).sqrt() * noise
        loss = F.mse_loss(ref.apply_model(x_t, t, ctx, x, only_mid_control=config.only_mid_control), noise)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            for p in trainable:
                p.grad = None
        return float(loss)

    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    dt_step = (time.perf_counter() - t0) / args.steps
    print(f"# PyTorch: first step {first:.1f}s, {dt_step:.3f}s/step", file=sys.stderr, flush=True)
    return first, dt_step


if __name__ == "__main__":
    main()
