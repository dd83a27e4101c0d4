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
  # an accelerator without the PyTorch baseline: random JAX weights, two samplers, fused attention,
  # and the fraction of the card's bf16 dense peak (H100/H200 SXM: 989 TFLOP/s)
  # (FLOPs per image as XLA:CPU counts them: --flops-only on a CPU gives 3355 and 1148)
  python benchmarks/bench_score.py --config sd15 --no-torch --batch 8 32 --samplers official 1@700! \
      --variants dedupe-fp32 dedupe-bf16 --attention cudnn --gflop-per-image 3355 1148 --peak-tflops 989
  # which operations of the bf16 SD-size eps program (SG network + UNet) run in float32 (no compile)
  python benchmarks/bench_score.py --config sd15 --hlo-report

A sampler is "official" (the reference: 10 DDIM steps, noised to t=999) or "S@T" (S steps from
start_t=T, consistent schedule) or "1@T!" (one_step: pred_x0 of one eps evaluation at T), or the
inversion method "invS@T" (S DDIM-inversion steps up to T, no reconstruction; issue 25):

  python benchmarks/bench_score.py --config sd15 --no-torch --batch 1 8 --samplers official 1@700! inv3@999 \
      --variants dedupe-fp32
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
    ap.add_argument("--no-torch", action="store_true",
                    help="skip the PyTorch baseline (weights: random JAX init; no torch import)")
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count())
    ap.add_argument("--samplers", nargs="+", default=["official"], help="official, S@T or 1@T! (see above)")
    ap.add_argument("--attention", choices=["xla", "cudnn"], default=None,
                    help="attention implementation of the bf16 variants (default: XLA's choice)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's dense bf16 peak, to report the fraction of it reached")
    ap.add_argument("--gflop-per-image", type=float, nargs="+", default=None,
                    help="FLOPs per image of each --samplers entry, for the fraction of peak (XLA:GPU's cost analysis "
                         "leaves out the cuDNN/cuBLAS calls, i.e. almost everything: take the CPU count, --flops-only)")
    ap.add_argument("--flops-only", action="store_true", help="compile and count FLOPs, do not time")
    ap.add_argument("--hlo-report", action="store_true",
                    help="only lower the bf16 eps program and count its float32 vs bf16 operations")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from diad_jax.configs import ModelConfig
    from diad_jax.models.diad import DiAD
    from diad_jax.scoring import Scorer, make_bundle, random_resnet

    cfg = getattr(ModelConfig, args.config)()
    ctx = np.random.default_rng(1).standard_normal((1, cfg.context_len, cfg.unet.context_dim)).astype(np.float32)
    if args.hlo_report:
        return hlo_report(cfg, ctx)
    t0 = time.perf_counter()
    ref = None
    if args.no_torch:
        params, resnet = DiAD(cfg).init(0), random_resnet(0)
    else:
        import torch
        from diad_jax.convert.ldm import ldm_to_params
        from diad_jax.convert.pipeline import convert_resnet
        from tests import oracle
        from tests.torch_reference import TorchDiAD

        torch.set_num_threads(args.torch_threads)
        sd = oracle.random_ldm_state_dict(cfg, seed=0)
        timm = oracle.random_timm_resnet50(0)
        params, _ = ldm_to_params(sd, DiAD(cfg).abstract_params())
        resnet, _ = convert_resnet(timm)
        ref = TorchDiAD(cfg, sd, timm)
    bundle = jax.device_put(make_bundle(params, resnet, ctx))  # on the device once
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
        for variant, sampler in [(v, sp) for v in args.variants for sp in args.samplers]:
            dedupe, prec = variant.split("-")
            dtype = jnp.bfloat16 if prec == "bf16" else jnp.float32
            diffusion, inversion = parse_sampler(sampler)
            method = dict(method="inversion", inversion_timesteps=inversion) if inversion else {}
            scorer = Scorer(cfg, diffusion, dtype=dtype, dedupe_guidance=dedupe == "dedupe",
                            attention=args.attention if prec == "bf16" else None, **method)
            uncond = None if dedupe == "dedupe" else bundle["context"]
            if inversion:
                fn = jax.jit(lambda bu, im, p, n, u: scorer.invert(bu, im, p, u))
            else:
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
            passes = len(inversion) if inversion else diffusion.ddim_steps
            loop_extra = (passes - 1) * float(eps_cost.get("flops", float("nan")))
            flops = (float(cost.get("flops", float("nan"))) + loop_extra) / b if cost else float("nan")
            if args.gflop_per_image:
                flops = args.gflop_per_image[args.samplers.index(sampler)] * 1e9
            elif jax.default_backend() != "cpu":
                flops = None  # XLA:GPU/TPU counts leave out library calls (convolutions, matmuls)
            if args.flops_only:
                counted = f"{flops / 1e9:.0f} GFLOP/image" if flops else "not counted on this backend (use the CPU)"
                print(f"  {variant}, sampler {sampler}, batch {b}: {counted}", flush=True)
                continue
            if args.repeats > 1:  # warm-up (with --repeats 1 the single timed call is the first one)
                out = jax.block_until_ready(compiled(bundle, images, post, noise, uncond))
            times = []
            for r in range(args.repeats):
                t = time.perf_counter()
                out = jax.block_until_ready(compiled(bundle, images, post, noise, uncond))
                times.append(time.perf_counter() - t)
                print(f"  ours {variant} b={b} run {r}: {times[-1]:.2f}s", flush=True)
            # the PyTorch baseline runs the official sampler only
            err = (float(np.abs(np.asarray(out.maps) - ref_maps).max()) if ref_maps is not None and sampler == "official"
                   else float("nan"))
            attn = f", {args.attention} attention" if args.attention and prec == "bf16" else ""
            rows.append(dict(impl=f"diad_jax Scorer, {'guidance half skipped' if dedupe == 'dedupe' else 'batched CFG (two halves)'}, {prec}{attn}, sampler {sampler}",
                             batch=b, t=min(times), err=err, compile=t_compile, flops=flops))
            print(f"  {rows[-1]['impl']}, batch {b}: {b / rows[-1]['t']:.2f} images/s, "
                  f"compile {t_compile:.0f}s", flush=True)
            del compiled, fn, scorer
            gc.collect()

    torch_version = "no torch" if ref is None else f"torch {sys.modules['torch'].__version__} ({args.torch_threads} threads)"
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{jax.devices()[0].device_kind} ({jax.default_backend()}); jax {jax.__version__}, {torch_version}; "
          f"config {args.config} ({cfg.image_size}x{cfg.image_size}, guidance 9)\n")
    print("| implementation | batch | latency / batch (s) | per image (s) | images/s | vs PyTorch | max abs map diff vs PyTorch | compile (s) | GFLOP / image | fraction of bf16 peak |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = {r["batch"]: r["t"] for r in rows if r["impl"].startswith("PyTorch")}
    for r in rows:
        ratio = f"{base[r['batch']] / r['t']:.2f}x" if r["batch"] in base else "-"
        fl = f"{r['flops'] / 1e9:.0f}" if r["flops"] else "-"
        err = "-" if r["impl"].startswith("PyTorch") or np.isnan(r["err"]) else f"{r['err']:.1e}"
        comp = "-" if not r["compile"] else f"{r['compile']:.0f}"
        peak = (f"{r['flops'] * r['batch'] / r['t'] / (args.peak_tflops * 1e12):.1%}"
                if args.peak_tflops and r["flops"] else "-")
        print(f"| {r['impl']} | {r['batch']} | {r['t']:.3f} | {r['t'] / r['batch']:.4f} | {r['batch'] / r['t']:.2f} | "
              f"{ratio} | {err} | {comp} | {fl} | {peak} |")


def parse_sampler(spec: str):
    """(DiffusionConfig, inversion timesteps or None): 'official' -> the reference's sampler;
    'S@T' -> S steps from start_t=T (consistent); '1@T!' -> one_step at T; 'invS@T' -> the
    inversion method's S timesteps up to T (with the reference's DiffusionConfig)."""
    from diad_jax.configs import DiffusionConfig
    from diad_jax.diffusion import inversion_timesteps
    if spec == "official":
        return DiffusionConfig(), None
    if spec.startswith("inv"):
        steps, _, end = spec[3:].partition("@")
        return DiffusionConfig(), tuple(inversion_timesteps(int(end), int(steps)))
    steps, _, start = spec.partition("@")
    one = start.endswith("!")
    return DiffusionConfig(schedule="consistent", ddim_steps=int(steps), start_t=int(start.rstrip("!")),
                           one_step=one), None


def hlo_report(cfg, ctx):
    """Counts the convolutions, matmuls and other float ops of the bf16 eps program (SG network +
    UNet, one DDIM step) by element type, from the lowered StableHLO (no compilation)."""
    import re
    from collections import Counter

    import jax
    import jax.numpy as jnp
    from diad_jax.models.diad import DiAD

    model = DiAD(cfg, dtype=jnp.bfloat16)
    abstract = {**model.abstract_params(), "context": jax.ShapeDtypeStruct(ctx.shape, jnp.float32)}
    lat = jax.ShapeDtypeStruct((1, 4, cfg.latent_size, cfg.latent_size), jnp.float32)
    img = jax.ShapeDtypeStruct((1, 3, cfg.image_size, cfg.image_size), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    text = jax.jit(lambda p, x, tt, h: model.eps(p, x, tt, p["context"], h)).lower(abstract, lat, t, img).as_text()
    counts = Counter()
    for line in text.splitlines():
        m = re.search(r"stablehlo\.(convolution|dot_general|reduce)\b.*:\s*\((.*)\)\s*->\s*tensor<[^>]*x(f32|bf16)>", line)
        if m:
            inputs = set(re.findall(r"x(f32|bf16)>", m.group(2)))
            counts[(m.group(1), "+".join(sorted(inputs)) + " -> " + m.group(3))] += 1
    kinds = sorted({k for _, k in counts})
    print(f"config {cfg.image_size}px, bf16 compute: StableHLO ops of one eps evaluation (SG network + UNet), "
          f"by operand -> result type")
    print("| op | " + " | ".join(kinds) + " |\n|---|" + "---:|" * len(kinds))
    for op in sorted({op for op, _ in counts}):
        print(f"| {op} | " + " | ".join(str(counts[(op, k)]) for k in kinds) + " |")


if __name__ == "__main__":
    main()
