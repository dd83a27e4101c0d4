"""What the training logs say about speed and memory: a step's FLOPs, the device's peak, MFU and
device memory."""
from __future__ import annotations

import jax

# Dense bf16 peak TFLOP/s per chip by `device_kind` substring (first match): the vendors' datasheets.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0), ("TPU v4", 275.0),
                    ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5", 459.0), ("TPU v6", 918.0))


def peak_tflops(device: jax.Device) -> float | None:
    """The device's dense bf16 peak from PEAK_BF16_TFLOPS (None: not in the table, e.g. a CPU)."""
    return next((peak for kind, peak in PEAK_BF16_TFLOPS if kind in device.device_kind), None)


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
