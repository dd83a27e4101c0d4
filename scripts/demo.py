#!/usr/bin/env python
"""The embedded default: build the tiny DiAD on CPU, run a denoising forward on generated
images, print shapes and timings. Needs no weights and no dataset."""
from __future__ import annotations

import argparse
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from diad_jax.configs import ModelConfig
from diad_jax.models.diad import DiAD

log = logging.getLogger("diad_jax.demo")


def generated_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Simple synthetic images (smooth colour gradients with a bright square), NCHW, ImageNet-
    normalised, so the demo needs nothing on disk."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs = []
    for _ in range(n):
        base = np.stack([a * xx + b * yy + c for a, b, c in rng.uniform(0, 0.5, (3, 3))], 0)
        x0, y0 = rng.integers(0, size // 2, 2)
        base[:, y0:y0 + size // 4, x0:x0 + size // 4] += 0.4
        imgs.append(np.clip(base, 0, 1))
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    return ((np.stack(imgs) - mean) / std).astype(np.float32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cfg = ModelConfig.tiny()
    model = DiAD(cfg)
    t0 = time.perf_counter()
    params = model.init(seed=args.seed)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    log.info("tiny DiAD: %.2fM parameters, initialised in %.2fs (backend: %s)",
             n_params / 1e6, time.perf_counter() - t0, jax.default_backend())

    images = jnp.asarray(generated_images(args.batch, cfg.image_size, args.seed))
    context = jnp.zeros((1, cfg.context_len, cfg.unet.context_dim))

    @jax.jit
    def denoise(params, images, rng):
        k_enc, k_noise = jax.random.split(rng)
        z0 = model.encode(params, images, k_enc)
        t = jnp.full((images.shape[0],), 500)
        noise = jax.random.normal(k_noise, z0.shape)
        acp = 0.5  # a mid-schedule noise level, for the shape/timing demo
        z_t = jnp.sqrt(acp) * z0 + jnp.sqrt(1 - acp) * noise
        eps = model.eps(params, z_t, t, context, images)
        z0_hat = (z_t - jnp.sqrt(1 - acp) * eps) / jnp.sqrt(acp)
        return z0, eps, model.decode(params, z0_hat)

    rng = jax.random.key(args.seed)
    t0 = time.perf_counter()
    z0, eps, recon = jax.block_until_ready(denoise(params, images, rng))
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(denoise(params, images, rng))
    t_step = time.perf_counter() - t0
    log.info("images %s -> latents %s -> eps %s -> reconstruction %s",
             tuple(images.shape), tuple(z0.shape), tuple(eps.shape), tuple(recon.shape))
    log.info("denoising forward: first call (compile + run) %.2fs, then %.3fs per batch of %d",
             t_first, t_step, args.batch)


if __name__ == "__main__":
    main()
