"""Device mesh and the ONE table of partitioning rules.

The mesh has two axes:

    data   pure data parallelism: params and optimizer state replicated along it
    fsdp   fully-sharded data parallelism: large kernels (and their optimizer state) are split
           along it, and the batch is split along it too

so a batch is sharded over ("data", "fsdp") and every device sees a different slice of it.
`make_mesh(data=-1, fsdp=1)` (the default) is plain data parallelism over all devices;
`make_mesh(data=1, fsdp=-1)` is ZeRO-3-style sharding over all devices; `dcn_data=N` splits the
data axis over N slices (a hybrid ICI/DCN mesh).

Parameters are placed by `PARTITION_RULES`: (regex over the "/"-joined param path, tactic) pairs,
first match wins (big_vision's sharding style). A tactic is either

* a `PartitionSpec` (used as is; its axes must divide the shape), or
* "fsdp": shard the LARGEST dimension divisible by the fsdp size (ties: the last one, i.e. the
  output channels of an HWIO conv or (in, out) dense kernel) over "fsdp"; arrays with fewer
  than `min_shard_size` elements, or with no divisible dimension, are replicated, or
* "replicate".

Paths are the param tree's keys joined by "/", e.g. ``unet/output_blocks_3_0/in_layers_2/kernel``
(groups: unet, sg, vae; checkpoints and scoring bundles add context and resnet, and checkpoints
nest the groups under params/). Optimizer state follows its param's sharding
(`opt_state_shardings` maps every param-shaped leaf of an optax state to the spec of the param it
belongs to; counters are replicated).
"""
from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diad_jax.configs import MeshConfig
from diad_jax.errors import UserError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over every device

# Arrays smaller than this (elements) are replicated by the "fsdp" tactic: 2**14 fp32 = 64 KiB.
# At SD size that replicates only biases, norm scales and a few tiny convs (about 1% of the bytes).
# One rule for scoring and training (where TrainConfig.mesh.min_shard_size may change it).
MIN_SHARD_SIZE = MeshConfig.min_shard_size

# (regex over "/"-joined param paths, tactic); first match wins.
PARTITION_RULES: tuple[tuple[str, Any], ...] = (
    # The text context and the ResNet-50 (in checkpoints and scoring bundles): small, replicated.
    (r"(context|resnet)(/.*)?", "replicate"),
    # Conv kernels (kh, kw, in, out) and dense kernels (in, out) of the UNet, SG network and VAE:
    # shard the largest fsdp-divisible dimension.
    (r".*/kernel$", "fsdp"),
    # Biases, GroupNorm/LayerNorm scales, frozen BatchNorm statistics: small, replicated.
    (r".*", "replicate"),
)


class MeshError(UserError):
    """A mesh that cannot be built on these devices."""


# ---- the mesh ----------------------------------------------------------------------------------
def resolve_mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
    """Sizes of (data, fsdp); at most one may be -1 (= all remaining devices)."""
    sizes = {"data": int(data), "fsdp": int(fsdp)}
    for name, s in sizes.items():
        if s == 0 or s < -1:
            raise MeshError(f"mesh axis {name!r} has size {s}; use a positive size or -1 (all remaining devices)")
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise MeshError(f"only one mesh axis may be -1, got data={data}, fsdp={fsdp}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise MeshError(f"{num_devices} devices cannot be split into "
                            + ", ".join(f"{n}={s}" for n, s in sizes.items() if s != -1)
                            + f" times a whole number for {free[0]!r}")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise MeshError(f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} = {fixed} devices, but "
                        f"{num_devices} are available; the product must equal the device count "
                        f"(or set one axis, {{0}} or {{1}}, to -1)", fields=["data", "fsdp"])
    return sizes["data"], sizes["fsdp"]


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None, *,
              dcn_data: int = 1) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: all devices of all processes), laid out by
    `jax.experimental.mesh_utils` from the physical topology (TPU: the ICI torus; GPU: device ids;
    CPU: `jax.devices()` order), as big_vision and MaxDiffusion do. `dcn_data` > 1 splits the data
    axis over that many slices (TPU multi-slice; elsewhere processes) joined by the slower data-center
    network: a hybrid mesh whose fsdp axis and the rest of data stay within a slice.

    Each process must own a contiguous block of the global batch (what `shard_batch` assumes, the
    batch being split over data x fsdp in that order): where the topology's layout breaks that, the
    devices are laid out in `jax.devices()` order (process by process) instead, or, for a hybrid mesh,
    MeshError. Axes are `Auto` (jit-with-shardings semantics, where `with_sharding_constraint` works).
    """
    devices = list(jax.devices() if devices is None else devices)
    d, f = resolve_mesh_shape(data, fsdp, len(devices))
    if dcn_data == 1:
        grid = mesh_utils.create_device_mesh((d, f), devices, allow_split_physical_axes=True)
        if not owns_contiguous_batch_blocks(grid):
            log.info("mesh: the topology's device order splits a process's batch; using jax.devices() order")
            grid = np.asarray(devices, dtype=object).reshape(d, f)
    else:
        grid = _hybrid_grid(d, f, dcn_data, devices)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def config_mesh(cfg: MeshConfig) -> Mesh:
    """`make_mesh` of a MeshConfig over all devices; its errors name the fields (`mesh.data`, ...)."""
    try:
        return make_mesh(cfg.data, cfg.fsdp, dcn_data=cfg.dcn_data)
    except MeshError as e:
        raise e.under("mesh") from None


def _hybrid_grid(d: int, f: int, dcn_data: int, devices: list) -> np.ndarray:
    """The (d, f) device grid of `make_mesh(..., dcn_data=n)`: n granules (slices, or processes where
    devices have no slice_index) along data, each a topology-aware (d / n, f) mesh."""
    if dcn_data < 1 or d % dcn_data:
        raise MeshError(f"{{0}} = {dcn_data} must be a positive divisor of the data axis ({d})",
                        fields=["dcn_data"])
    by_slice = getattr(devices[0], "slice_index", None) is not None
    granules = len({getattr(x, "slice_index" if by_slice else "process_index") for x in devices})
    if granules != dcn_data:
        raise MeshError(f"{{0}} = {dcn_data}, but the devices form {granules} "
                        f"{'slice' if by_slice else 'process'}(es) (a hybrid mesh needs one per DCN data "
                        f"shard)", fields=["dcn_data"])
    grid = mesh_utils.create_hybrid_device_mesh((d // dcn_data, f), (dcn_data, 1), devices,
                                                process_is_granule=not by_slice, allow_split_physical_axes=True)
    if not owns_contiguous_batch_blocks(grid):
        raise MeshError(f"{{0}} = {dcn_data}: in the hybrid layout a process's devices do not hold one "
                        f"contiguous block of the batch (data x fsdp); choose another {{1}}",
                        fields=["dcn_data", "fsdp"])
    return grid


def owns_contiguous_batch_blocks(grid: np.ndarray) -> bool:
    """Whether, with the batch split over the grid's devices in row-major order, every process's
    devices sit at consecutive positions."""
    owners = [x.process_index for x in np.asarray(grid).flat]
    runs = 1 + sum(a != b for a, b in zip(owners, owners[1:]))
    return runs == len(set(owners))


def single_device_mesh() -> Mesh:
    """A ("data",) mesh of this process's first device: where one-device loading and scoring go."""
    return Mesh(np.array(jax.local_devices()[:1]), ("data",))


def describe_mesh(mesh: Mesh) -> str:
    return " x ".join(f"{n}={s}" for n, s in mesh.shape.items()) + \
        f" ({mesh.devices.size} {mesh.devices.flat[0].platform} devices, {jax.process_count()} process(es))"


# ---- parameter rules ---------------------------------------------------------------------------
def path_str(path) -> str:
    """'/'-joined keys of a jax tree path (dict keys, attribute names, sequence indices)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_shard_size: int) -> P:
    if fsdp_size == 1 or math.prod(shape) < min_shard_size:
        return P()
    best = None
    for dim, n in enumerate(shape):
        if n % fsdp_size == 0 and (best is None or n >= shape[best]):
            best = dim
    if best is None:
        return P()
    return P(*([None] * best + ["fsdp"]))


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, rules=PARTITION_RULES,
             min_shard_size: int = MIN_SHARD_SIZE) -> P:
    """The PartitionSpec the rules give the param at `path` with `shape` on `mesh`."""
    for pattern, tactic in rules:
        if re.fullmatch(pattern, path):
            break
    else:
        raise ValueError(f"no partitioning rule matches parameter {path!r}; add a catch-all (r'.*', 'replicate')")
    if isinstance(tactic, P):
        for dim, axes in enumerate(tactic):
            if axes is None:
                continue
            size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
            if dim >= len(shape) or shape[dim] % size:
                raise ValueError(f"rule {pattern!r} gives {path!r} (shape {shape}) the spec {tactic}, "
                                 f"which does not divide dimension {dim}")
        return tactic
    if tactic == "replicate":
        return P()
    if tactic == "fsdp":
        return _fsdp_spec(tuple(shape), mesh.shape.get("fsdp", 1), min_shard_size)
    raise ValueError(f"unknown partitioning tactic {tactic!r} for rule {pattern!r}")


def param_specs(tree, mesh: Mesh, rules=PARTITION_RULES, min_shard_size: int = MIN_SHARD_SIZE):
    """PartitionSpec for every leaf (anything with .shape) of a param tree."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: spec_for(path_str(p), tuple(x.shape), mesh, rules, min_shard_size), tree)


def param_shardings(tree, mesh: Mesh, rules=PARTITION_RULES, min_shard_size: int = MIN_SHARD_SIZE):
    """NamedSharding for every leaf of a param tree."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(tree, mesh, rules, min_shard_size))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def opt_state_shardings(optimizer, abstract_opt_state, params_shardings, mesh: Mesh):
    """Shardings for an optax state: each param-shaped leaf (Adam moments, accumulated gradients,
    ...) gets the sharding of the param it belongs to; everything else (step counters) is replicated."""
    import optax

    rep = replicated(mesh)
    return optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt_state, params_shardings,
                                 transform_non_params=lambda _: rep,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying `shardings` (for jit lowering and orbax restore targets)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_tree, shardings)


# ---- placing data ------------------------------------------------------------------------------
def place(tree, shardings):
    """Put a pytree onto `shardings` (a matching tree of Shardings).

    Host leaves (numpy, identical on every process) are filled shard by shard from each process's
    own copy (`jax.make_array_from_callback`), so nothing crosses the network; jax.Array leaves
    already on their sharding are kept, the others resharded on device (`device_put` in one process;
    with several processes, where arrays span hosts, one jitted identity over all of them, compiled
    once per layout: `_reshard`)."""
    leaves, treedef = jax.tree.flatten(tree)
    shard_leaves = treedef.flatten_up_to(shardings)
    out = [None] * len(leaves)
    on_device = []
    for i, x in enumerate(leaves):
        if isinstance(x, jax.Array):
            if x.sharding.is_equivalent_to(shard_leaves[i], x.ndim):
                out[i] = x  # already where it belongs (e.g. restored onto these shardings)
            else:
                on_device.append(i)
        else:
            arr = np.asarray(x)
            out[i] = jax.make_array_from_callback(arr.shape, shard_leaves[i], lambda idx, a=arr: a[idx])
    if on_device:
        xs = [leaves[i] for i in on_device]
        ss = [shard_leaves[i] for i in on_device]
        if jax.process_count() == 1:
            moved = jax.device_put(xs, ss)
        else:
            moved = _reshard(tuple(ss))(tuple(xs))
        for i, y in zip(on_device, moved):
            out[i] = y
    return treedef.unflatten(out)


@functools.cache
def _reshard(shardings: tuple) -> Callable:
    """The jitted identity of a tuple of arrays onto `shardings`, one per tuple of shardings, so that
    jit's cache compiles it once per layout (leaf shapes, dtypes and input shardings)."""
    return jax.jit(lambda xs: xs, out_shardings=shardings)


def batch_sharding(mesh: Mesh, ndim: int = 1, axes: str | tuple[str, ...] = BATCH_AXES) -> NamedSharding:
    return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def batch_size_multiple(mesh: Mesh, axes: str | tuple[str, ...] = BATCH_AXES) -> int:
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes)


def shard_batch(local_batch: dict, mesh: Mesh, axes: str | tuple[str, ...] = BATCH_AXES) -> dict:
    """Assemble the per-process batches into global arrays split over `axes` along dimension 0.

    `local_batch` is this process's slice (dict of numpy arrays, the same leading size on every
    process); string/object fields (file names, class names) stay on the host and are dropped.
    The global batch is the concatenation of the processes' batches in process order."""
    out = {}
    n_dev = batch_size_multiple(mesh, axes)
    for k, v in local_batch.items():
        v = np.asarray(v)
        if v.dtype.kind in "USO":
            continue
        global_b = v.shape[0] * jax.process_count()
        if global_b % n_dev:
            raise ValueError(f"global batch {global_b} (field {k!r}) is not divisible by the {n_dev} devices "
                             f"of mesh axes {axes}; choose a batch size that is a multiple of {n_dev}")
        if v.dtype == np.int64:
            v = v.astype(np.int32)
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim, axes), v)
    return out


def gather_to_host(tree):
    """Fully replicate a (possibly multi-process) pytree of jax arrays onto every host as numpy."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)


def shard_summary(tree) -> str:
    """One line: how many bytes of `tree` (global) and per device, and how much is sharded."""
    total = sharded = 0
    per_dev = 0
    for x in jax.tree.leaves(tree):
        nbytes = x.size * x.dtype.itemsize
        total += nbytes
        spec = getattr(getattr(x, "sharding", None), "spec", P())
        n = 1
        mesh_shape = getattr(getattr(x, "sharding", None), "mesh", None)
        if spec and mesh_shape is not None:
            for axes in spec:
                if axes is None:
                    continue
                n *= math.prod(mesh_shape.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
        if n > 1:
            sharded += nbytes
        per_dev += nbytes / n
    return (f"{total / 2**20:.1f} MiB, {per_dev / 2**20:.1f} MiB per device "
            f"({100 * sharded / max(total, 1):.0f}% of the bytes sharded)")
