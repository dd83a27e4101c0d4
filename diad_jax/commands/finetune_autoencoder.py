"""Fine-tune the KL autoencoder (VAE) on the dataset, as the reference's finetune_autoencoder.py.

Loss: sum-L1 reconstruction (+ LPIPS when its two weight files are given) + 1e-6 KL on a posterior
sample; Adam(0.5, 0.9), lr 4.5e-5 x 4, batch 4 x accumulation 8 (--batch-size 32 --grad-accum 8),
about 25k updates (--preset reference). The reference's patch discriminator starts at step 50001,
so it never engages in those steps: it is not implemented, and --steps must stay below --disc-start. Without
--lpips-vgg16/--lpips-lin the loss is L1 + KL only (a warning says so). Nothing downloads.

Only the VAE trains; sharding, checkpoints, resume and multi-host work as in scripts/train.py.
Every checkpoint (<workdir>/checkpoints/<step>) is a full model checkpoint (UNet and SG network
carried through unchanged), so it can be passed to scripts/train.py --init-checkpoint.

Examples:
  python scripts/finetune_autoencoder.py                    # embedded default: tiny, synthetic, CPU
  # from SD v1.5 converted with its original VAE (convert/torch_to_flax.py --sd-ckpt ...):
  python scripts/finetune_autoencoder.py --preset reference --init-checkpoint checkpoints/sd15 \\
      --dataset mvtec_ad --manual-dir /data/mvtec_ad --workdir runs/vae_mvtec \\
      --lpips-vgg16 weights/vgg16-397923af.pth --lpips-lin weights/lpips_vgg.pth
  # then train DiAD from the fine-tuned checkpoint:
  python scripts/train.py --preset reference --init-checkpoint runs/vae_mvtec/checkpoints/25000 ...
"""
from __future__ import annotations

import argparse

from diad_jax import cli


def build_parser() -> cli.Parser:
    ap = cli.Parser(description=__doc__)
    cli.add_train_args(ap, presets=("tiny", "reference"))
    S = argparse.SUPPRESS
    g = ap.add_argument_group("autoencoder loss")
    g.add_argument("--kl-weight", dest="autoencoder.kl_weight", type=float, default=S,
                   help="KL weight (reference 1e-6)")
    g.add_argument("--perceptual-weight", dest="autoencoder.perceptual_weight", type=float, default=S,
                   help="LPIPS weight (reference 1.0)")
    g.add_argument("--lpips-vgg16", dest="autoencoder.lpips_vgg16", default=S,
                   help="torchvision VGG16 ImageNet state dict (local .pth)")
    g.add_argument("--lpips-lin", dest="autoencoder.lpips_lin", default=S,
                   help="LPIPS linear layers for VGG (vgg.pth, local)")
    g.add_argument("--disc-start", dest="autoencoder.disc_start", type=int, default=S,
                   help="the discriminator's start step (reference 50001); must exceed --steps")
    g.add_argument("--b1", dest="optimizer.b1", type=float, default=S, help="Adam beta1 (reference 0.5)")
    g.add_argument("--b2", dest="optimizer.b2", type=float, default=S, help="Adam beta2 (reference 0.9)")
    return ap


@cli.command(build_parser)
def main(args: argparse.Namespace, ap: cli.Parser) -> int:
    cli.setup_logging()
    from diad_jax import autoencoder

    base = autoencoder.tiny_config() if args.preset == "tiny" else autoencoder.reference_config()
    cfg = cli.config_from_args(base, args)
    if args.print_config:
        print(cfg.to_json())
        return 0
    ae = cfg.autoencoder
    if (ae.lpips_vgg16 is None) != (ae.lpips_lin is None):
        ap.error("give both --lpips-vgg16 and --lpips-lin, or neither (L1 + KL only)")
    autoencoder.check_config(cfg)
    cli.start(cfg, args)
    from diad_jax.train import Trainer

    lpips = autoencoder.load_lpips_params(ae.lpips_vgg16, ae.lpips_lin) if ae.lpips_vgg16 else None
    cli.write_config(cfg)
    cli.run(Trainer(cfg, task=autoencoder.autoencoder_task(cfg, lpips), overwrite_data=args.overwrite),
            args.no_progress)
    return 0

