"""Train DiAD (SG network + UNet decoder) with JAX: one CPU, GPUs, or a TPU pod / multi-node GPU job.

With no arguments, runs the embedded default: the tiny model on the generated "synthetic" dataset
(prepared on first use under $DIAD_DATA_DIR or ~/.cache/diad_jax/data) for 200 steps on CPU,
checkpointing to runs/tiny and evaluating at the end -- a few minutes, no weights, no downloads.

Configuration: a preset (--preset tiny | reference), then a JSON file of TrainConfig fields
(--config; nested as --print-config shows it: optimizer, data, eval, validation, checkpoint, mesh,
diffusion, ...), then the flags below, each of which sets one field. A run resumes from the latest
checkpoint in --workdir when there is one (--no-resume refuses to touch such a workdir).

Evaluation (--eval-every N, --eval-at-end) denoises and scores --eval-split and keeps the best
checkpoint by --best-metric in <workdir>/best. The default split is 'test', as the reference
selects its checkpoint on the test set (so the selected numbers are optimistic); pass
--eval-data-dir for a separately prepared validation set, or --eval-split none.

Examples:
  python scripts/train.py                                   # embedded default (tiny, synthetic, CPU)
  python scripts/train.py --steps 50 --workdir runs/quick   # shorter
  # the reference recipe from converted weights (convert/torch_to_flax.py --sd-ckpt ... --vae-ckpt ...),
  # batch 48 per update (reference: 12 x accumulation 4) on 8 devices, 6 each (on one GPU add
  # --grad-accum 16: 3 at a time); 1000 epochs of MVTec-AD (75 updates each), evaluated every 25 epochs:
  python scripts/train.py --preset reference --init-checkpoint checkpoints/diad_init \\
      --dataset mvtec_ad --manual-dir /data/mvtec_ad --workdir runs/mvtec \\
      --batch-size 48 --grad-accum 1 --steps 75000 --eval-every 1875 \\
      --mesh-data 1 --mesh-fsdp -1 --dtype bfloat16 --remat
  # multi-host (TPU pod, or one process per GPU node): the SAME command on every host, plus
  python scripts/train.py ... --distributed        # jax.distributed.initialize(), auto-detected (TPU/SLURM/MPI)
  python scripts/train.py ... --distributed --coordinator 10.0.0.1:1234 --num-processes 4 --process-id $RANK

Outputs in --workdir: checkpoints/<step>/ (each also a model checkpoint for scripts/evaluate.py),
best/<step>/, metrics.jsonl, tensorboard/, train_config.json.
"""
from __future__ import annotations

import argparse

from diad_jax import cli
from diad_jax.configs import FUSIONS, EvalConfig, TrainConfig


def build_parser() -> cli.Parser:
    ap = cli.Parser(description=__doc__)
    cli.add_train_args(ap, presets=("tiny", "reference"))
    S = argparse.SUPPRESS
    g = ap.add_argument_group("DiAD")
    g.add_argument("--only-mid-control", type=cli.boolean, default=S,
                   help="override the model's only_mid_control (released train.py: true)")
    g.add_argument("--fusion", choices=FUSIONS, default=S,
                   help="override the model's fusion block: sff (the reference) or none (the paper's ablation); "
                        "the SFF trains only with --only-mid-control false")
    g.add_argument("--train-t-max", type=int, default=S,
                   help="train on the noise levels t < this (default 1000, the reference); see --start-t of "
                        "diad-jax evaluate")
    g = ap.add_argument_group("evaluation")
    g.add_argument("--eval-every", dest="validation.every", type=int, default=S,
                   help="evaluate every N steps (0: never during training)")
    g.add_argument("--eval-at-end", dest="validation.at_end", type=cli.boolean, default=S,
                   help="evaluate after the last step")
    g.add_argument("--eval-split", dest="validation.split", default=S,
                   help="split that is evaluated and selects the best checkpoint (default 'test', as the "
                        "reference; 'none' disables evaluation)")
    g.add_argument("--eval-data-dir", dest="validation.data_dir", default=S,
                   help="a prepared dataset directory to evaluate on instead")
    g.add_argument("--best-metric", dest="validation.best_metric", default=S,
                   help="'+'-joined mean metrics (default p_auroc+i_auroc)")
    g.add_argument("--eval-resnet", dest="validation.resnet", choices=["checkpoint", "random"], default=S,
                   help="checkpoint (default): evaluate with --init-checkpoint's ResNet-50; random: opt in to a "
                        "randomly initialised one (maps compare random features; recorded in the checkpoints)")
    g = ap.add_argument_group("how the evaluations score (the flags of diad-jax evaluate, prefixed --eval-)")
    cli.add_eval_config_flags(g, prefix="eval-")
    g.add_argument("--metrics-variant", dest="eval.variant", choices=EvalConfig.CHOICES["variant"], default=S,
                   help="deprecated alias of --eval-variant")
    return ap


@cli.command(build_parser)
def main(args: argparse.Namespace, ap: cli.Parser) -> int:
    cli.setup_logging()
    base = TrainConfig.tiny() if args.preset == "tiny" else TrainConfig.reference()
    cfg = cli.config_from_args(base, args)
    if args.print_config:
        print(cfg.to_json())
        return 0
    cli.start(cfg, args)
    from diad_jax.train import Trainer

    cli.write_config(cfg)
    cli.run(Trainer(cfg, overwrite_data=args.overwrite), args.no_progress)
    return 0

