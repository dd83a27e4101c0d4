"""Configuration as frozen dataclasses (plain Python, no config framework), one idea per module.
Each module imports only those above it:

    constants       the reference's constants and the choices several configs share
    checks          the field checks of the configs' __post_init__ (errors name the field)
    serialization   Section: to/from dict and JSON, unknown keys, errors named by section; set_path
    model           UNetConfig, VAEConfig, ModelConfig (the architecture)
    sampler         DiffusionConfig (noise schedule + DDIM plan, ldm's spacing rules), FAST_SAMPLER
    evaluation      EvalConfig (how images are scored) and its choices
    training        TrainConfig and its sections
    legacy          the flat TrainConfig names of older versions, read only where old files are read

Everything is importable from `diad_jax.configs`.
"""
from diad_jax.configs.constants import (COMPARATORS, COMPUTE_DTYPES, DATASETS, FUSIONS, IMAGENET_MEAN, IMAGENET_STD,
                                        LR_SCHEDULES, NO_WEIGHTS_COMPARATOR, REFERENCE_MAP_SIZE, REFERENCE_POOL_WINDOW,
                                        REFERENCE_SIGMA, REMAT_POLICIES, RESNET_CHOICES)
from diad_jax.configs.evaluation import (ATTENTION_IMPLEMENTATIONS, IMAGE_SCORES, INVERSION_LATENTS, METHODS,
                                        METRIC_VARIANTS, EvalConfig)
from diad_jax.configs.legacy import FLAT_TRAIN_FIELDS, REMAT_OF_BOOL, unflatten_train_dict
from diad_jax.configs.model import ModelConfig, UNetConfig, VAEConfig
from diad_jax.configs.sampler import FAST_SAMPLER, SCHEDULES, DiffusionConfig, spaced_timesteps, uniform_timesteps
from diad_jax.configs.serialization import set_path
from diad_jax.configs.training import (TRAINABLE, AutoencoderConfig, CheckpointConfig, DataConfig, MeshConfig,
                                       OptimizerConfig, TrainConfig, ValidationConfig)

__all__ = [
    "COMPARATORS", "COMPUTE_DTYPES", "DATASETS", "FUSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "LR_SCHEDULES",
    "NO_WEIGHTS_COMPARATOR",
    "REFERENCE_MAP_SIZE", "REFERENCE_POOL_WINDOW", "REFERENCE_SIGMA", "REMAT_POLICIES", "RESNET_CHOICES",
    "ATTENTION_IMPLEMENTATIONS", "IMAGE_SCORES", "INVERSION_LATENTS", "METHODS", "METRIC_VARIANTS", "EvalConfig",
    "FLAT_TRAIN_FIELDS", "REMAT_OF_BOOL", "unflatten_train_dict",
    "ModelConfig", "UNetConfig", "VAEConfig",
    "FAST_SAMPLER", "SCHEDULES", "DiffusionConfig", "spaced_timesteps", "uniform_timesteps",
    "set_path",
    "TRAINABLE", "AutoencoderConfig", "CheckpointConfig", "DataConfig", "MeshConfig", "OptimizerConfig",
    "TrainConfig", "ValidationConfig",
]
