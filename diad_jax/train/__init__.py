"""Training (scripts/train.py, scripts/finetune_autoencoder.py), one idea per module:

    task.py         what a run optimises: the `Task` plug-in, DiAD's loss and task, the optimiser
    state.py        TrainState and `StepFactory`: the jitted, sharded train step
    checkpoint.py   `Checkpointer` (step folders that are also model checkpoints), restoring the newest one
    latents.py      the cached VAE posterior moments of the training images (cache_latents)
    metrics_log.py  metrics.jsonl + TensorBoard
    perf.py         what the logs say about speed and memory: a step's FLOPs, the device's peak, MFU
    sources.py      the model and data a run starts from, and the checks before the first step
    validation.py   evaluation inside a run (the one evaluation engine) and the best checkpoint
    loop.py         `Trainer` and its `Hook`s

    trainer = Trainer(TrainConfig.tiny(workdir="runs/x"))
    trainer.run()            # resumes from runs/x/checkpoints if there is a checkpoint
    trainer.close()
"""
from diad_jax.train.checkpoint import Checkpointer, check_resume_compatible, restore_latest, tune_orbax_array_handler
from diad_jax.train.latents import cached_moments
from diad_jax.train.loop import Hook, ProfileHook, StepInfo, Trainer
from diad_jax.train.metrics_log import MetricWriter, read_metrics
from diad_jax.train.sources import (ModelSource, check_batch, check_eval_resnet, default_data_dir, prepare_data,
                                    train_iterator, validates)
from diad_jax.train.state import StepFactory, TrainState, init_train_state
from diad_jax.train.task import Task, diad_task, diffusion_loss, learning_rate, make_optimizer
from diad_jax.train.validation import Validator, selection_value

__all__ = ["Checkpointer", "Hook", "MetricWriter", "ModelSource", "ProfileHook", "StepFactory", "StepInfo", "Task",
           "TrainState", "Trainer", "Validator", "cached_moments", "check_batch", "check_eval_resnet",
           "check_resume_compatible",
           "default_data_dir", "diad_task", "diffusion_loss", "init_train_state", "learning_rate", "make_optimizer",
           "prepare_data", "read_metrics", "restore_latest", "selection_value", "train_iterator",
           "tune_orbax_array_handler", "validates"]
