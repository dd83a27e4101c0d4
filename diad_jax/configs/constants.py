"""The reference's constants and the named choices that more than one config (or module) uses.

Imports nothing of diad_jax: every other configs module, and scoring, data and the commands, read
their fixed numbers and allowed values here.
"""
from __future__ import annotations

# The reference's anomaly-map blur sigma and image-score max-pool window, both for its 256 px maps
# (EvalConfig.scaled_footprint scales them to other sizes).
REFERENCE_MAP_SIZE = 256
REFERENCE_SIGMA = 5.0
REFERENCE_POOL_WINDOW = 8

# The reference's input normalisation (ImageNet mean and std per RGB channel): model inputs are
# (x / 255 - mean) / std, NCHW.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The dataset builders of diad_jax.data (named here so a config can be checked without importing them).
DATASETS = ("mvtec_ad", "mvtec_ad_2", "visa", "real_iad", "folder", "synthetic")

# The SG network's fusion block (models/sg_network.py): the reference's Spatial-aware Feature Fusion,
# or none (the residuals pass unchanged; no fusion params).
FUSIONS = ("sff", "none")

# Compute dtypes of training and scoring (parameters stay float32 either way).
COMPUTE_DTYPES = ("float32", "bfloat16")

# TrainConfig.remat: what each UNet/SG res and transformer block keeps from its forward pass for the
# backward, the rest being recomputed from the block's input (models/layers.py, REMAT_SAVES):
# "none" no rematerialisation; "blocks" nothing (the least memory); "dots" the outputs of matmuls
# without batch dims, i.e. the linear layers (jax.checkpoint_policies.dots_with_no_batch_dims_saveable);
# "convs_and_dots" those and every convolution (only norms, activations and attention recomputed).
REMAT_POLICIES = ("none", "blocks", "dots", "convs_and_dots")

# OptimizerConfig.schedule: the learning rate after the warmup
LR_SCHEDULES = ("constant", "cosine")

# What compares an image with its reconstruction (diad_jax.scoring): the reference's ResNet-50
# features, or comparators that need no ImageNet weights (see EvalConfig.comparator).
COMPARATORS = ("resnet", "pixel_l1", "ssim", "vae")
# The comparator without ImageNet weights that scored best on the demo models: benchmarks/RESULTS.md,
# "Comparators" (a benchmark of this port, not a reference setting). The demo's comparator, and what
# a missing ResNet-50 error proposes.
NO_WEIGHTS_COMPARATOR = "pixel_l1"
# Where the resnet comparator's ResNet-50 comes from: the checkpoint's, or a randomly initialised one
# (maps then compare random features; recorded in every checkpoint so scoring repeats it).
RESNET_CHOICES = ("checkpoint", "random")
