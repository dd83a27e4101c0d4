"""Cached VAE posterior moments of the training images (TrainConfig.cache_latents).

DiAD trains with a frozen VAE on images that are not augmented, so the posterior mean and log-variance
of every training image never change during a run: `cached_moments` computes them once and stores
them beside the prepared data as

    <prepared dataset>/latent_moments/<split>-<key>.npy     float32 (N, 2, C, h, w): mean, logvar

where N is the split's size (row i: the example with "index" i) and the key hashes the VAE weights,
the image size, the compute dtype and the prepared files, so a changed VAE or re-prepared data gets a
new file. The train step then samples the posterior from a batch's rows with the same per-example key
as when it encodes the images itself (train/task.py, `diffusion_loss`).
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from diad_jax import data as data_lib
from diad_jax import sharding as shd
from diad_jax.models.diad import DiAD

log = logging.getLogger(__name__)


def cache_path(model: DiAD, vae_params, dataset: data_lib.PreparedDataset, split: str) -> Path:
    """Where the moments of `split` encoded by these VAE weights are stored."""
    h = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_leaves_with_path(shd.gather_to_host(vae_params)),
                             key=lambda kv: jax.tree_util.keystr(kv[0])):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    h.update(f"{model.config.image_size} {jnp.dtype(model.dtype).name}".encode())
    root = Path(dataset.path)
    for f in sorted(p for p in root.iterdir() if p.is_file()):
        st = f.stat()
        h.update(f"{f.name} {st.st_size} {st.st_mtime_ns}".encode())
    return root / "latent_moments" / f"{split}-{h.hexdigest()[:16]}.npy"


def cached_moments(model: DiAD, vae_params, dataset: data_lib.PreparedDataset, split: str, mesh: Mesh,
                   batch_size: int) -> np.ndarray:
    """The (N, 2, C, h, w) moments of `split`, read from its cache file when one with this key holds
    N rows, else computed on `mesh` (every process its share, `batch_size` images per step over all
    processes) and written. With several processes the computation is collective: it runs when any
    of them lacks the file (host-local data), and each that lacked it writes its copy."""
    path = cache_path(model, vae_params, dataset, split)
    n = len(dataset.indices(split))
    moments = _read(path, n, split)
    lacking = moments is None
    if jax.process_count() > 1:
        lacking_anywhere = bool(np.any(multihost_utils.process_allgather(np.int32(lacking))))
    else:
        lacking_anywhere = lacking
    if not lacking_anywhere:
        log.info("latent moments of %d %s images from %s", n, split, path)
        return moments
    log.info("computing the VAE posterior moments of %d %s images (once; cached in %s)", n, split, path.parent)
    computed = compute_moments(model, vae_params, dataset, split, mesh, batch_size)
    if lacking:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.save(f, computed)
        os.replace(tmp, path)  # a reader never sees a partial file
    return computed


def _read(path: Path, n: int, split: str) -> np.ndarray | None:
    """The stored moments (memory-mapped) when `path` holds `n` rows, else None."""
    if not path.exists():
        return None
    moments = np.load(path, mmap_mode="r")
    if moments.shape[0] != n:
        log.warning("%s holds %d rows, the %s split %d: computing them again", path, moments.shape[0], split, n)
        return None
    return moments


def compute_moments(model: DiAD, vae_params, dataset: data_lib.PreparedDataset, split: str, mesh: Mesh,
                    batch_size: int) -> np.ndarray:
    """`model.encode_moments` of every image of `split`, in index order, sharded over the mesh's batch
    axes (each process reads its share of every batch; padding rows are dropped)."""
    encode = jax.jit(lambda vae, images: jnp.stack(model.encode_moments({"vae": vae}, images), axis=1),
                     out_shardings=shd.batch_sharding(mesh, 5))
    c, s = model.config.vae.embed_dim, model.config.latent_size
    out = np.zeros((len(dataset.indices(split)), 2, c, s, s), np.float32)
    n_proc = jax.process_count()
    batches = data_lib.eval_dataset(dataset, batch_size // n_proc, split=split, image_size=model.config.image_size,
                                    shard_index=jax.process_index(), shard_count=n_proc)
    for b in batches:
        local = {"image": b["image"], "index": b["index"]}
        placed = shd.shard_batch(local, mesh)
        moments, index = shd.gather_to_host((encode(vae_params, placed["image"]), placed["index"]))
        valid = index >= 0
        out[index[valid]] = moments[valid]
    return out
