"""What the training logs say about speed and memory: a step's FLOPs, the device's peak, MFU and
device memory."""
from __future__ import annotations

import math
from collections.abc import Iterator

import jax
from jax.extend.core import jaxprs_in_params

# Dense bf16 peak TFLOP/s per chip by `device_kind` substring (first match): the vendors' datasheets.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0), ("TPU v4", 275.0),
                    ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5", 459.0), ("TPU v6", 918.0))


def peak_tflops(device: jax.Device) -> float | None:
    """The device's dense bf16 peak from PEAK_BF16_TFLOPS (None: not in the table, e.g. a CPU)."""
    return next((peak for kind, peak in PEAK_BF16_TFLOPS if kind in device.device_kind), None)


def model_flops(jaxpr) -> float:
    """FLOPs of the matrix work in a (closed) jaxpr: every dot_general, convolution and cuDNN
    attention call, 2 per multiply-add, sub-jaxprs included (a scan's body times its length, the
    largest branch of a cond). The count is the program's before partitioning (global shapes), the
    same on every backend: XLA:GPU's compiled cost analysis leaves out the cuBLAS/cuDNN calls, and on
    a mesh XLA:CPU's counts work that the sharded program repeats. Elementwise work is left out, as
    in the usual definition of MFU; what remat recomputes is counted (it runs on the device)."""
    return sum(flops for _, _, flops in matrix_ops(jaxpr))


def matrix_ops(jaxpr, times: int = 1) -> Iterator[tuple[str, tuple[str, ...], float]]:
    """(primitive name, operand dtypes, FLOPs) of each matrix operation `model_flops` counts, in
    program order, the FLOPs of a scan's body times its length, of a cond only its largest branch."""
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        name, operands = eqn.primitive.name, [v.aval for v in eqn.invars if hasattr(v.aval, "shape")]
        shapes, dtypes = [a.shape for a in operands], tuple(str(a.dtype) for a in operands[:2])
        out = math.prod(eqn.outvars[0].aval.shape) if eqn.outvars and hasattr(eqn.outvars[0].aval, "shape") else 0
        if name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            yield name, dtypes, times * 2.0 * out * math.prod(shapes[0][d] for d in contracting)
        elif name == "conv_general_dilated":
            # (out features, in features, *spatial); a dilated input (a strided convolution's input
            # gradient) meets a kernel tap only at every lhs_dilation-th position: its zeros are not work
            rhs_spec = eqn.params["dimension_numbers"].rhs_spec
            yield name, dtypes, (times * 2.0 * out * math.prod(shapes[1][d] for d in rhs_spec[1:])
                                 / math.prod(eqn.params["lhs_dilation"]))
        elif name.startswith("dot_product_attention_"):  # jax.nn.dot_product_attention(implementation="cudnn")
            q, k = shapes[0], shapes[1]  # (B, T, N, H) and (B, S, N, H)
            matmuls = 2 if "_fwd" in name else 4  # fwd: QK^T, PV; bwd: dV, dP, dQ, dK
            yield name, dtypes, times * 2.0 * matmuls * math.prod(q) * k[1]
        subs = list(jaxprs_in_params(eqn.params))
        if name == "cond" and subs:
            subs = [max(subs, key=model_flops)]
        for sub in subs:
            yield from matrix_ops(sub, times * (eqn.params["length"] if name == "scan" else 1))


def device_memory(device: jax.Device) -> dict[str, float]:
    """GiB in use and the peak so far on `device`, where the backend reports them (GPUs, TPUs; not CPUs)."""
    stats = device.memory_stats()
    if not stats:
        return {}
    out = {"memory_in_use_gib": stats["bytes_in_use"] / 2**30}
    if "peak_bytes_in_use" in stats:
        out["memory_peak_gib"] = stats["peak_bytes_in_use"] / 2**30
    return out


def throughput(steps: int, images: int, seconds: float, flops_per_step: float, n_devices: int,
               peak: float | None) -> dict[str, float]:
    """One log interval's speed: step time, images/s, TFLOP/s per device and, when the device's peak
    is known, MFU (the fraction of that peak the step's counted FLOPs reach)."""
    tflops = flops_per_step * steps / seconds / n_devices / 1e12
    out = {"step_time_s": seconds / steps, "images_per_s": images / seconds, "tflops_per_device": tflops}
    if peak:
        out["mfu"] = tflops / peak
    return out
