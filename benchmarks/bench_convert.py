#!/usr/bin/env python
"""Conversion wall time and peak RSS for an SD-size DiAD checkpoint (random weights).

Builds a complete reference-layout checkpoint at the sd15 sizes (UNet, SG network, VAE, the CLIP
ViT-L/14 text tower, the timm ResNet-50, schedule buffers; ~1.4 B parameters, ~5.7 GB in fp32),
writes it as .ckpt (torch pickle) and/or .safetensors, then runs `convert/torch_to_flax.py` on it
in a fresh process and reports wall time and that process's peak resident memory.

  python benchmarks/bench_convert.py --format ckpt safetensors --workdir /tmp/bench_convert
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_checkpoint(seed: int = 0) -> dict:
    import torch
    from tests import oracle
    from diad_jax.configs import ModelConfig
    cfg = ModelConfig.sd15()
    sd = oracle.random_ldm_state_dict(cfg, seed=seed)
    sd.update(oracle.random_clip_state_dict(768, layers=12, seed=seed))
    sd.update({"pretrained_model." + k: v for k, v in oracle.random_timm_resnet50(seed).items()})
    sd["betas"] = np.linspace(1e-4, 2e-2, 1000, dtype=np.float32)
    sd["alphas_cumprod"] = np.cumprod(1 - sd["betas"]).astype(np.float32)
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", nargs="+", default=["ckpt"], choices=["ckpt", "safetensors"])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/diad_bench_convert"))
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    import torch
    t0 = time.perf_counter()
    sd = build_checkpoint()
    n_params = sum(v.numel() for v in sd.values())
    size = sum(v.numel() * v.element_size() for v in sd.values())
    print(f"built random SD-size checkpoint: {n_params / 1e9:.3f} B params, {size / 2**30:.2f} GiB "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    files = {}
    for fmt in args.format:
        path = args.workdir / f"diad_sd15.{fmt}"
        t0 = time.perf_counter()
        if fmt == "ckpt":
            torch.save({"state_dict": sd}, path)
        else:
            from safetensors.torch import save_file
            save_file(sd, str(path))
        files[fmt] = path
        print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB, {time.perf_counter() - t0:.0f}s)", flush=True)
    del sd
    rows = []
    for fmt, path in files.items():
        out = args.workdir / f"flax_{fmt}"
        cmd = [sys.executable, str(ROOT / "convert" / "torch_to_flax.py"), "--diad-ckpt", str(path),
               "--out", str(out), "--overwrite"]
        # a fresh child per run, so RUSAGE_CHILDREN's max RSS is this run's
        code = ("import resource,subprocess,sys,time;t=time.perf_counter();r=subprocess.run(sys.argv[1:]);"
                "print('WALL',time.perf_counter()-t);"
                "print('RSS',resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);sys.exit(r.returncode)")
        res = subprocess.run([sys.executable, "-c", code] + cmd, capture_output=True, text=True)
        print(res.stdout[-3000:], res.stderr[-3000:])
        if res.returncode:
            raise SystemExit(f"conversion failed ({fmt})")
        wall = float(res.stdout.split("WALL")[1].split()[0])
        rss = int(res.stdout.split("RSS")[1].split()[0]) * 1024
        rows.append((fmt, path.stat().st_size, wall, rss))
        if not args.keep:
            import shutil
            shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        for p in files.values():
            p.unlink()
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"python {platform.python_version()}, torch {torch.__version__}\n")
    print("| source format | file size (GiB) | wall time (s) | peak RSS (GiB) | RSS / file size |")
    print("|---|---:|---:|---:|---:|")
    for fmt, fsize, wall, rss in rows:
        print(f"| .{fmt} | {fsize / 2**30:.2f} | {wall:.1f} | {rss / 2**30:.2f} | {rss / fsize:.2f}x |")


if __name__ == "__main__":
    main()
