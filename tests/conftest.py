"""Shared test configuration: small model configs and the CPU device count."""
import os

# The suite is compile-bound on 2 cores: XLA:CPU compiles without LLVM's expensive passes
# (-O0), with its classic LLVM fusion emitters instead of the MLIR ones and in one codegen thread, and
# runs each op on one thread (the two xdist workers already keep both cores busy). Measured on the
# micro model's train step: 16.9 s of CPU to compile at -O0 alone, 5.5 s with the last two settings.
# Numerics are unchanged (no fast math either way).
TEST_XLA_SETTINGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                     "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1 "
                     "--xla_cpu_multi_thread_eigen=false")


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process (this one, or a subprocess) with `devices` forced CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {TEST_XLA_SETTINGS}"


# Multi-device code is tested on 8 forced CPU devices (must be set before jax initialises).
os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session (set here in pytest's main process, so the xdist
# workers and the subprocess tests inherit it): tests that build the same program again (a new
# Scorer for the same model, a re-run of a CLI) load it instead of compiling it. Only programs that
# took over a second to compile are stored. Removed when the session ends (by the process that made it).
SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile
    SESSION_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="diad_jax_test_cache_")

import pytest  # noqa: E402

from diad_jax.configs import ModelConfig, UNetConfig, VAEConfig  # noqa: E402


def sd_structured_config() -> ModelConfig:
    """SD v1.5's structure (4 levels, 2 res blocks, attention at ds 1, 2, 4, 13 SG residuals)
    at small widths: 128x128 images, 16x16 latents, so the SFF works on 4x4 -> 2x2 maps."""
    return ModelConfig.tiny(
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                        attention_resolutions=(4, 2, 1), num_heads=8, context_dim=64),
        image_size=128,
    )


# The tiny model's structure at its smallest (one res block per level, no attention, a 2x VAE on
# 32 px images): tests that train or score compile in about half the tiny model's time.
MICRO = ModelConfig.tiny(
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                    num_heads=4, context_dim=64),
    vae=VAEConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8), hint_block_channels=(16, 32),
    image_size=32)


CONFIGS = {"tiny": ModelConfig.tiny, "sd_structured": sd_structured_config}


def pytest_unconfigure(config):
    if SESSION_CACHE is not None:
        import shutil
        shutil.rmtree(SESSION_CACHE, ignore_errors=True)


@pytest.fixture(params=sorted(CONFIGS))
def small_config(request) -> ModelConfig:
    return CONFIGS[request.param]()
