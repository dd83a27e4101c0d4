"""diad_jax: DiAD (diffusion-based multi-class anomaly detection) in JAX/Flax.

    import diad_jax
    detector = diad_jax.load("checkpoints/diad_mvtec")     # a model checkpoint or a training workdir
    predictions = detector.predict("new_images/")           # scores, maps, and verdicts when calibrated
"""
from diad_jax.configs import DiffusionConfig, EvalConfig, ModelConfig, UNetConfig, VAEConfig

__version__ = "0.1.0"

__all__ = ["Detector", "DiffusionConfig", "EvalConfig", "ModelConfig", "Prediction", "UNetConfig", "VAEConfig",
           "__version__", "load"]


def __getattr__(name: str):
    # the detector pulls in JAX, the models and the data readers: imported on first use, so that the
    # scripts' argument parsing and `--help` stay fast
    if name in ("Detector", "Prediction", "load"):
        from diad_jax import detector
        return getattr(detector, name)
    raise AttributeError(f"module 'diad_jax' has no attribute {name!r}")
