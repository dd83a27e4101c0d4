"""A training run (TrainConfig): the model and the loss's settings, then one section per concern
(data, optimizer, mesh, checkpoints, validation, evaluation, autoencoder fine-tuning)."""
from __future__ import annotations

from dataclasses import dataclass, field

from diad_jax.configs.checks import require_choice, require_finite, require_ints
from diad_jax.configs.constants import COMPUTE_DTYPES, DATASETS, FUSIONS, LR_SCHEDULES, REMAT_POLICIES, RESNET_CHOICES
from diad_jax.configs.evaluation import EvalConfig
from diad_jax.configs.sampler import DiffusionConfig
from diad_jax.configs.serialization import Section, as_tuple, set_path
from diad_jax.errors import ConfigError

# TrainConfig.trainable: "reference": SG network + UNet decoder; "sg+unet": also the UNet encoder
TRAINABLE = ("reference", "sg+unet")


@dataclass(frozen=True)
class OptimizerConfig(Section):
    """AdamW as torch.optim.AdamW (the reference's optimiser, its defaults) with a constant learning
    rate; each step is one update from `grad_accum` micro-batches of the step's batch (gradients
    averaged inside the step); an optional EMA of the trained params. Beyond the reference, off by
    default: a linear warmup over `warmup_steps` updates, a cosine decay to `end_learning_rate` at the
    run's last step, and clipping the update's gradient to a global norm of `max_grad_norm`."""

    learning_rate: float = 1e-5
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_accum: int = 4                 # micro-batches per step (the reference: 4 of 12)
    ema_decay: float | None = None      # EMA of the trainable params (None: off, as the reference)
    schedule: str = "constant"          # one of LR_SCHEDULES (after the warmup)
    warmup_steps: int = 0               # linear warmup: update s (from 0) uses lr * min(1, (s + 1) / warmup_steps)
    end_learning_rate: float = 0.0      # where "cosine" ends (at TrainConfig.steps)
    max_grad_norm: float | None = None  # clip the gradient to this global norm (None: no clipping, as the reference)
    offload_state: bool = False         # keep the optimizer state (AdamW's moments) in host memory between steps

    def __post_init__(self):
        require_finite(self, "learning_rate", "weight_decay", "eps", "end_learning_rate")
        for name in ("learning_rate", "eps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{{0}} must be > 0, got {getattr(self, name)}", fields=[name])
        for name in ("weight_decay", "end_learning_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{{0}} must be >= 0, got {getattr(self, name)}", fields=[name])
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:  # also false for NaN
                raise ConfigError(f"{{0}} must be in [0, 1), got {getattr(self, name)}", fields=[name])
        require_ints(self, "grad_accum")
        require_ints(self, "warmup_steps", minimum=0)
        require_choice(self, "schedule", LR_SCHEDULES)
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"{{0}} must be in (0, 1) or None, got {self.ema_decay}", fields=["ema_decay"])
        if self.max_grad_norm is not None:
            require_finite(self, "max_grad_norm")
            if self.max_grad_norm <= 0:
                raise ConfigError(f"{{0}} must be > 0 or None, got {self.max_grad_norm}", fields=["max_grad_norm"])

    @property
    def scheduled(self) -> bool:
        """Whether the learning rate changes over the run (the reference's is constant)."""
        return self.schedule != "constant" or self.warmup_steps > 0


@dataclass(frozen=True)
class DataConfig(Section):
    """The training data: which dataset (prepared once under data_dir), which classes and split, and
    the global batch."""

    dataset: str = "synthetic"          # one of constants.DATASETS
    data_dir: str | None = None         # prepared datasets; None: $DIAD_DATA_DIR or ~/.cache/diad_jax/data
    manual_dir: str | None = None       # the downloaded dataset's root (not for "synthetic")
    options: dict = field(default_factory=dict)  # data.prepare(**options), e.g. train_per_class
    skip_bad: bool = False              # skip (and list) unreadable files and images without a mask
    classes: tuple[str, ...] | None = None  # None: every class, mixed
    train_split: str = "train"
    batch_size: int = 48                # global batch per step = per update (all devices, hosts, micro-batches)

    def __post_init__(self):
        if not isinstance(self.options, dict):
            raise ConfigError(f"{{0}} must be a mapping, got {self.options!r}", fields=["options"])
        object.__setattr__(self, "options", dict(self.options))
        if self.classes is not None:
            object.__setattr__(self, "classes", as_tuple(self.classes))
        require_choice(self, "dataset", DATASETS)
        require_ints(self, "batch_size")


@dataclass(frozen=True)
class ValidationConfig(Section):
    """When a training run evaluates, on what, and how it picks its best checkpoint (how images are
    scored is TrainConfig.eval)."""

    every: int = 0                      # steps between evaluations (0: only at_end)
    at_end: bool = False
    split: str | None = "test"          # the split that selects the best checkpoint (reference: test); None: no eval
    data_dir: str | None = None         # a separately prepared dataset directory to evaluate on instead
    best_metric: str = "p_auroc+i_auroc"  # sum of mean metrics (reference val_acc = P-AUROC + I-AUROC)
    # one of constants.RESNET_CHOICES: "checkpoint": the resnet comparator needs the ResNet-50 of the init
    # checkpoint; "random": a randomly initialised one
    resnet: str = "checkpoint"

    def __post_init__(self):
        require_ints(self, "every", minimum=0)
        require_choice(self, "resnet", RESNET_CHOICES)

    @property
    def active(self) -> bool:
        """Whether the run evaluates at all (a split, and a schedule)."""
        return bool(self.split) and bool(self.every or self.at_end)


@dataclass(frozen=True)
class CheckpointConfig(Section):
    """Training checkpoints under <workdir>/checkpoints (each step also a model checkpoint)."""

    save_every: int = 1000
    keep: int = 3                       # the most recent checkpoints kept
    async_save: bool = True             # write in the background
    resume: bool = True                 # continue from the latest checkpoint in workdir if there is one

    def __post_init__(self):
        require_ints(self, "save_every", "keep")


@dataclass(frozen=True)
class MeshConfig(Section):
    """The device mesh (data x fsdp; the batch is split over both) and which params are sharded."""

    data: int = -1                      # data-parallel axis size (-1: all remaining devices)
    fsdp: int = 1                       # fsdp axis size (-1: all remaining devices)
    min_shard_size: int = 2 ** 14       # params with fewer elements are replicated
    dcn_data: int = 1                   # > 1: the data axis split over this many slices (a hybrid ICI/DCN mesh)

    def __post_init__(self):
        require_ints(self, "dcn_data", minimum=1)


@dataclass(frozen=True)
class AutoencoderConfig(Section):
    """The VAE fine-tuning task's loss (diad_jax/autoencoder.py, scripts/finetune_autoencoder.py);
    DiAD training ignores it."""

    kl_weight: float = 1e-6
    perceptual_weight: float = 1.0      # LPIPS weight, when its weights are given
    lpips_vgg16: str | None = None      # torchvision VGG16 state dict (local file)
    lpips_lin: str | None = None        # LPIPS linear layers for VGG (vgg.pth, local file)
    disc_start: int = 50_001            # the reference's discriminator start (not implemented: must exceed steps)

    def __post_init__(self):
        require_finite(self, "kl_weight", "perceptual_weight")
        for name in ("kl_weight", "perceptual_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{{0}} must be >= 0, got {getattr(self, name)}", fields=[name])

@dataclass(frozen=True)
class TrainConfig(Section):
    """A training run (diad_jax/train): the model, then one section per concern. The defaults are the
    reference's (train.py + sgn.py + ldm ddpm.py: AdamW 1e-5, weight decay 0.01, batch 12 x
    accumulation 4 = batch 48 per update, fp32, seed 1); `TrainConfig.tiny()` is the embedded default
    (tiny model, generated data, CPU, a few minutes). A step is one optimizer update on `data.batch_size`
    images, computed as `optimizer.grad_accum` micro-batches inside the step; every step count
    (steps, save_every, validation.every, log_every, profile_steps) counts updates.
    """

    # ---- model -----------------------------------------------------------------------------------
    model: str = "sd15"                 # "sd15", "tiny", "demo" or a ModelConfig JSON file (not with init_checkpoint)
    init_checkpoint: str | None = None  # converted model checkpoint (convert/torch_to_flax.py): params, context, ResNet
    only_mid_control: bool | None = None  # override the model config's (None: keep it; released: True)
    fusion: str | None = None           # override the model config's fusion block, "sff" | "none" (None: keep it)
    compute_dtype: str = "float32"      # one of constants.COMPUTE_DTYPES (fp32 master weights either way)
    remat: str = "none"                 # what each block keeps for the backward pass: constants.REMAT_POLICIES
    trainable: str = "reference"        # one of TRAINABLE
    # ---- the DiAD loss ---------------------------------------------------------------------------
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)  # the noise schedule trained on
    train_t_max: int = 1000             # noise levels trained on: t ~ U{0..train_t_max-1} (the reference: all)
    cache_latents: bool = False         # VAE posterior moments of the training images computed once (train/latents.py)
    # ---- the run ---------------------------------------------------------------------------------
    steps: int = 75_000                 # total steps (optimizer updates) of the run, resumed runs included
                                        # (75k: the reference's 1000 epochs of MVTec-AD at 48 per update)
    seed: int = 1
    workdir: str = "runs/diad"          # checkpoints/, best/, metrics.jsonl, tensorboard/
    log_every: int = 10
    profile_steps: tuple[int, int] | None = None  # [first, last): a jax.profiler trace in <workdir>/profile
    peak_tflops: float | None = None    # the device's peak for the logged MFU (None: train/perf.py's table)
    # ---- sections --------------------------------------------------------------------------------
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # how validation scores images
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)

    SECTIONS = {"data": DataConfig, "optimizer": OptimizerConfig, "mesh": MeshConfig, "checkpoint": CheckpointConfig,
                "validation": ValidationConfig, "eval": EvalConfig, "diffusion": DiffusionConfig,
                "autoencoder": AutoencoderConfig}

    def __post_init__(self):
        for name, section in self.SECTIONS.items():
            if not isinstance(getattr(self, name), section):
                raise ConfigError(f"{{0}} must be a {section.__name__}, got {getattr(self, name)!r}", fields=[name])
        require_choice(self, "compute_dtype", COMPUTE_DTYPES)
        require_choice(self, "fusion", (None, *FUSIONS))
        require_choice(self, "trainable", TRAINABLE)
        require_choice(self, "remat", REMAT_POLICIES)
        require_ints(self, "steps", "log_every")
        require_ints(self, "seed", minimum=0)
        if self.peak_tflops is not None:
            require_finite(self, "peak_tflops")
            if self.peak_tflops <= 0:
                raise ConfigError(f"{{0}} must be > 0 or None, got {self.peak_tflops}", fields=["peak_tflops"])
        T = self.diffusion.num_train_timesteps
        if not isinstance(self.train_t_max, int) or not 1 <= self.train_t_max <= T:
            raise ConfigError(f"{{0}} must be an integer in 1..{T} ({{1}}), got {self.train_t_max!r}",
                              fields=["train_t_max", "diffusion.num_train_timesteps"])
        if self.profile_steps is not None:
            steps = as_tuple(self.profile_steps)
            if not (isinstance(steps, tuple) and len(steps) == 2 and all(type(x) is int for x in steps)
                    and 0 <= steps[0] < steps[1]):
                raise ConfigError(f"{{0}} must be (first, last) with 0 <= first < last, got {self.profile_steps!r}",
                                  fields=["profile_steps"])
            object.__setattr__(self, "profile_steps", steps)

    @classmethod
    def tiny(cls, **changes) -> "TrainConfig":
        """The embedded default: tiny model, generated 64x64 dataset, plain data parallelism on
        whatever devices there are, a higher learning rate so the loss visibly drops in minutes.
        `changes` by dotted path, as `replace` takes them."""
        base = cls(model="tiny", steps=200, workdir="runs/tiny", log_every=10,
                   data=DataConfig(batch_size=8, options=dict(train_per_class=24, test_per_class=8)),
                   optimizer=OptimizerConfig(learning_rate=1e-4, grad_accum=1),
                   checkpoint=CheckpointConfig(save_every=100),
                   validation=ValidationConfig(at_end=True, resnet="random"))
        return base.replace(**changes)

    @classmethod
    def reference(cls, **changes) -> "TrainConfig":
        """The released train.py's hyperparameters (batch 12 x accumulation 4, AdamW 1e-5, fp32, seed 1),
        trained from cached latents (same loss and updates; at SD size 1.26x faster on a CPU and 31%
        fewer FLOPs per update: benchmarks/RESULTS.md)."""
        return cls(cache_latents=True).replace(**changes)

    def replace(self, **changes) -> "TrainConfig":
        """This config with fields changed by dotted path, e.g. cfg.replace(steps=50,
        **{"optimizer.learning_rate": 1e-4}); a whole section may be given too (data=DataConfig(...))."""
        d = self.to_dict()
        for path, value in changes.items():
            set_path(d, path, value)
        return TrainConfig.from_dict(d)
