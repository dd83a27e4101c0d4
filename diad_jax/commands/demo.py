"""The embedded default (`make demo`): train a tiny DiAD from scratch on the generated dataset, on
CPU, then evaluate it: the seven metrics per class and heat-map PNGs. No weights, no downloads.

Stages (each resumable: rerunning continues or skips what is done; --fresh starts over):
  1. prepare the generated 5-class dataset (64x64; 60 train / 40 test images per class)
  2. autoencoder: train the demo VAE (L1 + 1e-6 KL, as scripts/finetune_autoencoder.py without LPIPS)
  3. scale: measure the latent std and set scale_factor = 1/std (ldm's scale_by_std); this writes
     the initial DiAD checkpoint <workdir>/init
  4. diad: train the SG network + the whole UNet (from scratch, the UNet encoder cannot stay
     random) with the reference's eps-MSE loss, AdamW, EMA of the weights (scripts/train.py)
  5. evaluate the EMA weights on the test split (the library's one evaluation loop) and store
     thresholds in the final checkpoint, so that scripts/predict.py gives verdicts

Differences from the reference recipe, all forced by training from scratch in minutes on a CPU, are
printed at the end. Input and reconstruction are compared per pixel (the "pixel_l1" comparator, the
best one measured without ImageNet weights) instead of by the reference's ResNet-50 features (no
weights are downloaded).

Examples:
  python scripts/demo.py                        # the whole thing, ~13 minutes on 2 CPU cores
  python scripts/demo.py --quick                # a 2-minute smoke run (the model barely learns)
  python scripts/demo.py --diad-steps 3000      # longer training (resumes from a finished run)
  python scripts/demo.py --dataset mvtec_ad --manual-dir my_images --classes a b --data-dir my_cache \
      --workdir runs/mine                       # the same recipe on your images (any layout of --dataset)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

from diad_jax import cli
from diad_jax.configs import DATASETS, NO_WEIGHTS_COMPARATOR, TrainConfig
from diad_jax.errors import ConfigError

log = logging.getLogger("diad_jax.demo")


def build_parser() -> cli.Parser:
    ap = cli.Parser(description=__doc__)
    ap.add_argument("--workdir", type=Path, default=Path("runs/demo"), help="checkpoints, logs, results")
    ap.add_argument("--data-dir", type=Path, default=Path("data_cache"), help="where the prepared dataset goes")
    ap.add_argument("--dataset", choices=DATASETS, default="synthetic",
                    help="the generated dataset (default), or a dataset layout read from --manual-dir")
    ap.add_argument("--manual-dir", type=Path, help="the dataset's folder (every --dataset but synthetic)")
    ap.add_argument("--classes", nargs="+", help="the classes to train and evaluate on (default: the dataset's)")
    ap.add_argument("--vae-steps", type=cli.positive_int, default=400,
                    help="autoencoder steps (batch --vae-batch-size)")
    ap.add_argument("--diad-steps", type=cli.positive_int, default=2250, help="DiAD steps (batch --batch-size)")
    ap.add_argument("--batch-size", type=cli.positive_int, default=8, help="DiAD training batch (and evaluation batch)")
    ap.add_argument("--vae-batch-size", type=cli.positive_int, default=16, help="autoencoder training batch")
    ap.add_argument("--vae-lr", type=cli.positive_float, default=2e-3)
    ap.add_argument("--lr", type=cli.positive_float, default=3e-4, help="DiAD AdamW learning rate")
    ap.add_argument("--ema-decay", type=float, default=0.995)
    ap.add_argument("--train-t-max", type=cli.positive_int, default=TrainConfig.train_t_max,
                    help="DiAD trains on the noise levels t < this (default: all 1000)")
    ap.add_argument("--seed", type=cli.nonnegative_int, default=TrainConfig.seed,
                    help="training seed (initialisation, data order, noise) of both models; the dataset is fixed")
    ap.add_argument("--schedule", choices=["official", "consistent"], default="consistent",
                    help="evaluation DDIM schedule (see README, 'Differences from the reference')")
    ap.add_argument("--heatmaps", type=cli.nonnegative_int, default=4, help="heat-map PNGs per class")
    ap.add_argument("--limit-per-class", type=cli.positive_int, default=None,
                    help="evaluate a balanced subset of N test images per class (default: all 40)")
    ap.add_argument("--quick", action="store_true", help="60 + 200 steps: checks that everything runs")
    ap.add_argument("--fresh", action="store_true", help="delete --workdir first")
    ap.add_argument("--no-progress", action="store_true")
    return ap


@cli.command(build_parser)
def main(args: argparse.Namespace, ap: cli.Parser) -> int:
    if args.quick:
        args.vae_steps, args.diad_steps = 60, 200
    cli.setup_logging()

    import jax

    from diad_jax import autoencoder
    from diad_jax import data as dataio
    from diad_jax import sharding as shd
    from diad_jax.calibration import calibrate
    from diad_jax.checkpoints import load_model, save_model
    from diad_jax.configs import EvalConfig, ModelConfig
    from diad_jax.detector import load
    from diad_jax.evaluation import evaluate
    from diad_jax.models.diad import DiAD
    from diad_jax.train import Trainer, check_batch

    # every configuration is built and checked before the first (long) stage starts
    init_dir = args.workdir / "init"
    manual_dir = None if args.manual_dir is None else str(args.manual_dir)
    common = {"model": "demo", "data.dataset": args.dataset, "data.data_dir": str(args.data_dir),
              "data.manual_dir": manual_dir, "data.classes": args.classes, "data.options": {},
              "optimizer.grad_accum": 1, "log_every": 10, "seed": args.seed, "validation.split": None,
              "validation.at_end": False}
    vae_cfg = autoencoder.tiny_config(**common, steps=args.vae_steps, workdir=str(args.workdir / "autoencoder"),
                                      **{"data.batch_size": args.vae_batch_size, "optimizer.learning_rate": args.vae_lr,
                                         "checkpoint.save_every": max(1, args.vae_steps // 2)})
    # how the checkpoints are scored (recorded in them, so scripts/predict.py and evaluate.py need no
    # flags): the schedule, the footprint scaled to 64 px, and a comparator that needs no ImageNet weights
    scoring = EvalConfig(schedule=args.schedule, batch_size=args.batch_size,
                         comparator=NO_WEIGHTS_COMPARATOR).scaled_footprint(ModelConfig.demo().image_size)
    diad_cfg = TrainConfig.tiny(**common, init_checkpoint=str(init_dir), trainable="sg+unet", steps=args.diad_steps,
                                train_t_max=args.train_t_max, workdir=str(args.workdir / "diad"), eval=scoring,
                                **{"data.batch_size": args.batch_size, "optimizer.learning_rate": args.lr,
                                   "optimizer.ema_decay": args.ema_decay,
                                   "checkpoint.save_every": max(1, args.diad_steps // 4)})
    for cfg, batch_flag in ((vae_cfg, "vae_batch_size"), (diad_cfg, "batch_size")):
        try:
            check_batch(cfg, shd.config_mesh(cfg.mesh), evaluates=False)
        except ConfigError as e:  # named by the flag that sets the stage's batch
            raise e.renamed(lambda field: batch_flag if field == "data.batch_size" else field) from e
    if args.fresh and args.workdir.exists():
        shutil.rmtree(args.workdir)
    cli.check_writable(args.workdir, "workdir")
    cli.check_writable(args.data_dir, "data_dir")
    times = {}
    config = ModelConfig.demo()
    log.info("backend %s, %d device(s); demo model: 64x64 images -> 16x16x4 latents", jax.default_backend(),
             jax.device_count())

    # 1. data
    t0 = time.perf_counter()
    prepared = dataio.prepare(args.dataset, args.data_dir, manual_dir=manual_dir, classes=args.classes,
                              image_size=config.image_size)
    times["data"] = time.perf_counter() - t0

    # 2. autoencoder
    t0 = time.perf_counter()
    vae_ckpt = args.workdir / "autoencoder" / "checkpoints" / str(args.vae_steps)
    if _must_train("stage 1/3: autoencoder", vae_ckpt):
        trainer = Trainer(vae_cfg, task=autoencoder.autoencoder_task(vae_cfg))
        cli.run(trainer, args.no_progress)
    times["autoencoder"] = time.perf_counter() - t0

    # 3. scale_factor from the latent std -> the initial DiAD checkpoint
    if _source(init_dir) != str(vae_ckpt):
        ckpt = load_model(vae_ckpt)
        std = autoencoder.latent_std(DiAD(ckpt.config), ckpt.params, prepared)
        config = dataclasses.replace(ckpt.config, scale_factor=1.0 / std)
        log.info("latent std %.4f -> scale_factor %.4f (SD's VAE: 0.18215)", std, config.scale_factor)
        save_model(init_dir, config=config, params=ckpt.params, context=ckpt.context, resnet=None, kind="init",
                   metadata={"source": str(vae_ckpt)}, overwrite=True)

    # 4. DiAD
    t0 = time.perf_counter()
    final = args.workdir / "diad" / "checkpoints" / str(args.diad_steps)
    if _must_train("stage 2/3: DiAD (SG network + UNet)", final):
        trainer = Trainer(diad_cfg)
        cli.run(trainer, args.no_progress)
    times["diad"] = time.perf_counter() - t0

    # 5. evaluation of the EMA weights (the model items of a training checkpoint), then thresholds
    t0 = time.perf_counter()
    detector = load(final)  # the checkpoint records its scoring settings
    ec = detector.eval_config
    log.info("stage 3/3: evaluating the test split (%s schedule, %s comparator, blur sigma %.2f, pool window %d)",
             ec.schedule, ec.comparator, ec.sigma, ec.pool_window)
    result = evaluate(detector, prepared, heatmaps_per_class=args.heatmaps, progress=not args.no_progress,
                      limit_per_class=args.limit_per_class)
    result.info.update(demo={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    cal = calibrate(result, source={"dataset": args.dataset, "split": "test"})
    cal.save(final)
    out = result.save(args.workdir / "eval")
    times["evaluate"] = time.perf_counter() - t0

    mean = result.metrics["mean"]
    print(f"\n{result.table}\n")
    print(f"Mean I-AUROC {100 * mean['i_auroc']:.1f}, P-AUROC {100 * mean['p_auroc']:.1f}, "
          f"AUPRO {100 * mean['aupro']:.1f} on {len(result.labels)} {args.dataset} test images.")
    print(f"NOTE: input and reconstruction are compared per pixel ({ec.comparator} comparator, the best measured "
          f"without ImageNet weights; benchmarks/RESULTS.md); the reference compares ResNet-50 features: convert "
          f"ImageNet weights (diad-jax convert --resnet) and score with --comparator resnet.")
    print("Demo recipe vs the reference (all because it trains from scratch on a CPU in minutes): a 4x VAE "
          "trained first with scale_factor = 1/latent std; the whole UNet trains (the reference freezes its "
          "pretrained encoder); lr 3e-4 with an EMA; evaluation with the 'consistent' schedule and the blur / "
          "image-score pool scaled to 64 px (sigma 1.25, window 2).")
    print("Timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()) +
          f" (total {sum(times.values()):.0f}s)")
    print(f"Thresholds (F1-optimal on the test split, so optimistic) stored in {final}: image "
          f"{cal.image.value:.4g}, pixel {cal.pixel.value:.4g}.")
    print(f"Results, heat maps and checkpoints: {out}/, {args.workdir}/diad/checkpoints/")
    dataset = "" if args.dataset == "synthetic" else f" --dataset {args.dataset}"
    print(f"Re-evaluate: diad-jax evaluate --checkpoint {final}{dataset} --data-dir {args.data_dir} "
          f"(--preset fast: one network pass per image; --preset inversion: reconstruction-free, 5 passes)")
    print(f"Verdicts on any images: diad-jax predict --checkpoint {final} --input <folder> --out preds")
    (args.workdir / "timings.json").write_text(json.dumps(times, indent=2))
    return 0


def _must_train(stage: str, last_checkpoint: Path) -> bool:
    """Whether a training stage must run (or resume): not when its last checkpoint is committed."""
    if last_checkpoint.is_dir():
        log.info("%s: done (%s)", stage, last_checkpoint)
        return False
    log.info("%s, %s steps", stage, last_checkpoint.name)
    return True


def _source(ckpt_dir: Path) -> str | None:
    from diad_jax.checkpoints import read_metadata
    from diad_jax.errors import CheckpointError
    try:
        return read_metadata(ckpt_dir).get("source")
    except CheckpointError:  # a missing or unreadable init checkpoint is rebuilt
        return None

