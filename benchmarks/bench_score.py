#!/usr/bin/env python
"""Denoise-and-score throughput: diad_jax's one-program `Scorer` vs the same algorithm in PyTorch.

The PyTorch baseline (tests/torch_reference.py) is the reference's test path transcribed on
diffusers' PyTorch models (ControlNet + SFF, UNet, VAE) and transformers' ResNet-50, with the same
random weights and the same noise; it runs the guidance as the reference does (one batched pass over
[uncond; cond]). Both run in this process, back to back, on the same machine. Reported: latency per
batch, images/s, ratio to PyTorch, the max abs difference of the maps, compile time, and the XLA
FLOP count per image (from `compiled.cost_analysis()`, which counts every multiply-add as 2 FLOPs).

  python benchmarks/bench_score.py --config sd15 --batch 1 8
  python benchmarks/bench_score.py --config tiny --batch 1 8 --repeats 3   # quick check
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["tiny", "sd15"], default="sd15")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=2,
                    help="timed runs per setting, the best reported (after one warm-up when > 1)")
    ap.add_argument("--variants", nargs="+", default=["dedupe-fp32", "twopass-fp32", "dedupe-bf16"],
                    choices=["dedupe-fp32", "twopass-fp32", "dedupe-bf16", "twopass-bf16"])
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch
    from diad_jax.configs import DiffusionConfig, ModelConfig
    from diad_jax.convert.ldm import ldm_to_params
    from diad_jax.convert.pipeline import convert_resnet
    from diad_jax.models.diad import DiAD
    from diad_jax.scoring import Scorer, make_bundle
    from tests import oracle
    from tests.torch_reference import TorchDiAD

    torch.set_num_threads(args.torch_threads)
    cfg = getattr(ModelConfig, args.config)()
    t0 = time.perf_counter()
    sd = oracle.random_ldm_state_dict(cfg, seed=0)
    timm = oracle.random_timm_resnet50(0)
    params, _ = ldm_to_params(sd, DiAD(cfg).abstract_params())
    resnet, _ = convert_resnet(timm)
    ctx = np.random.default_rng(1).standard_normal((1, cfg.context_len, cfg.unet.context_dim)).astype(np.float32)
    bundle = make_bundle(params, resnet, ctx)
    ref = None if args.no_torch else TorchDiAD(cfg, sd, timm)
    print(f"weights ready in {time.perf_counter() - t0:.0f}s", flush=True)

    rows = []
    for b in args.batch:
        rng = np.random.default_rng(b)
        images = rng.standard_normal((b, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
        lat = (b, 4, cfg.latent_size, cfg.latent_size)
        post, noise = rng.standard_normal(lat).astype(np.float32), rng.standard_normal(lat).astype(np.float32)
        ref_maps = None
        if ref is not None:
            times = []
            for r in range(args.repeats):
                t = time.perf_counter()
                recon = ref.reconstruct(images, post, noise, ctx)
                ref_maps, _ = ref.score(images, recon)
                times.append(time.perf_counter() - t)
                print(f"  torch b={b} run {r}: {times[-1]:.2f}s", flush=True)
            rows.append(dict(impl="PyTorch (diffusers), batched CFG as the reference", batch=b, t=min(times),
                             err=0.0, compile=0.0, flops=None))
        for variant in args.variants:
            dedupe, prec = variant.split("-")
            dtype = jnp.bfloat16 if prec == "bf16" else jnp.float32
            scorer = Scorer(cfg, DiffusionConfig(), dtype=dtype, dedupe_guidance=dedupe == "dedupe")
            uncond = None if dedupe == "dedupe" else bundle["context"]
            fn = jax.jit(lambda bu, im, p, n, u: scorer.score_with_noise(bu, im, p, n, u))
            t = time.perf_counter()
            compiled = fn.lower(bundle, images, post, noise, uncond).compile()
            t_compile = time.perf_counter() - t
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            # XLA's cost analysis counts a while loop's body once: add the other DDIM steps' UNet + SG
            # passes, each costed as the eps program at the batch the loop body runs
            nb = b if dedupe == "dedupe" else 2 * b
            eps_cost = jax.jit(lambda bu, x, t, c, h: scorer.model.eps(bu, x, t, c, h)).lower(
                bundle, np.zeros((nb, 4, cfg.latent_size, cfg.latent_size), np.float32), np.zeros((nb,), np.int32),
                np.zeros((nb,) + ctx.shape[1:], np.float32),
                np.zeros((nb, 3, cfg.image_size, cfg.image_size), np.float32)).compile().cost_analysis()
            eps_cost = eps_cost[0] if isinstance(eps_cost, (list, tuple)) else eps_cost
            loop_extra = (DiffusionConfig().ddim_steps - 1) * float(eps_cost.get("flops", float("nan")))
            flops = (float(cost.get("flops", float("nan"))) + loop_extra) / b if cost else float("nan")
            if args.repeats > 1:  # warm-up (with --repeats 1 the single timed call is the first one)
                out = jax.block_until_ready(compiled(bundle, images, post, noise, uncond))
            times = []
            for r in range(args.repeats):
                t = time.perf_counter()
                out = jax.block_until_ready(compiled(bundle, images, post, noise, uncond))
                times.append(time.perf_counter() - t)
                print(f"  ours {variant} b={b} run {r}: {times[-1]:.2f}s", flush=True)
            err = float(np.abs(np.asarray(out.maps) - ref_maps).max()) if ref_maps is not None else float("nan")
            rows.append(dict(impl=f"diad_jax Scorer, {'guidance half skipped' if dedupe == 'dedupe' else 'batched CFG (two halves)'}, {prec}",
                             batch=b, t=min(times), err=err, compile=t_compile, flops=flops))
            del compiled, fn, scorer
            gc.collect()

    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU; "
          f"jax {jax.__version__}, torch {torch.__version__} ({args.torch_threads} threads); config {args.config} "
          f"({cfg.image_size}x{cfg.image_size}, 10 DDIM steps, official schedule, guidance 9)\n")
    print("| implementation | batch | latency / batch (s) | per image (s) | images/s | vs PyTorch | max abs map diff vs PyTorch | compile (s) | GFLOP / image |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = {r["batch"]: r["t"] for r in rows if r["impl"].startswith("PyTorch")}
    for r in rows:
        ratio = f"{base[r['batch']] / r['t']:.2f}x" if r["batch"] in base else "-"
        fl = f"{r['flops'] / 1e9:.0f}" if r["flops"] else "-"
        err = "-" if r["impl"].startswith("PyTorch") or np.isnan(r["err"]) else f"{r['err']:.1e}"
        comp = "-" if not r["compile"] else f"{r['compile']:.0f}"
        print(f"| {r['impl']} | {r['batch']} | {r['t']:.2f} | {r['t'] / r['batch']:.2f} | {r['batch'] / r['t']:.2f} | "
              f"{ratio} | {err} | {comp} | {fl} |")


if __name__ == "__main__":
    main()
