"""diad_jax: DiAD (diffusion-based multi-class anomaly detection) in JAX/Flax."""
from diad_jax.configs import DiffusionConfig, ModelConfig, UNetConfig, VAEConfig

__version__ = "0.1.0"

__all__ = ["DiffusionConfig", "ModelConfig", "UNetConfig", "VAEConfig", "__version__"]
