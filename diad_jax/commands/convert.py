"""Convert reference PyTorch checkpoints into one diad_jax (orbax) model checkpoint.

Examples:
  # a trained DiAD checkpoint (control_model., model.diffusion_model., first_stage_model.,
  # cond_stage_model. and usually pretrained_model. = the timm ResNet-50)
  python convert/torch_to_flax.py --diad-ckpt models/output.ckpt --out checkpoints/diad_mvtec

  # start of training: SD v1.5 + the fine-tuned autoencoder (+ ResNet-50 weights for scoring)
  python convert/torch_to_flax.py --sd-ckpt models/v1-5-pruned.ckpt --vae-ckpt models/mvtecad_fs.ckpt \\
      --resnet models/resnet50_a1_in1k.pth --out checkpoints/diad_init

Every source key is consumed or explicitly ignored (schedule buffers, EMA copies, CLIP after it has
produced the context, layer4/fc of the ResNet); anything else aborts with the full list of
missing / unexpected / mis-shaped keys, grouped by prefix, unless allowed with --allow-missing /
--allow-unexpected. Weights stored as float16, bfloat16 or float64 are cast to float32 (the summary
counts them); integer or boolean ones (a quantised checkpoint) are refused, each named.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

from diad_jax import cli
from diad_jax.checkpoints import save_model
from diad_jax.configs import ModelConfig
from diad_jax.convert import pipeline
from diad_jax.convert.ldm import IGNORED_PATTERNS
from diad_jax.convert.torch_io import read_state_dict
from diad_jax.errors import ConfigError

log = logging.getLogger("diad_jax.convert")


def build_parser() -> cli.Parser:
    ap = cli.Parser(description=__doc__)
    src = ap.add_argument_group("sources (one of --diad-ckpt or --sd-ckpt)")
    src.add_argument("--diad-ckpt", type=Path, help="trained DiAD state dict (.ckpt/.pt/.pth/.safetensors)")
    src.add_argument("--sd-ckpt", type=Path, help="Stable Diffusion v1.5 checkpoint (start of training)")
    src.add_argument("--vae-ckpt", type=Path, help="fine-tuned autoencoder (keys with or without first_stage_model.)")
    src.add_argument("--resnet", type=Path, help="timm/torchvision ResNet-50 state dict (overrides pretrained_model.*)")
    src.add_argument("--prompt-context", type=Path,
                     help="precomputed (1, 77, 768) .npy context instead of running CLIP")
    ap.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    ap.add_argument("--config", default="sd15", help="model config: sd15 (default), tiny, or a JSON file")
    ap.add_argument("--only-mid-control", choices=["true", "false"], default=None,
                    help="store this only_mid_control in the config (default: the config's, True as released)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the SG network's new layers (--sd-ckpt)")
    ap.add_argument("--allow-missing", action="append", default=[], metavar="PATTERN",
                    help="glob of target keys that may be absent (filled with zeros); repeatable")
    ap.add_argument("--allow-unexpected", action="append", default=[], metavar="PATTERN",
                    help="glob of source keys that may be left unused; repeatable")
    ap.add_argument("--allow-non-finite", action="store_true",
                    help="convert tensors holding NaN or inf instead of refusing them (they will score nonsense)")
    ap.add_argument("--unsafe-pickle", action="store_true",
                    help="load pickles with full unpickling (only for files you trust)")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ap.add_argument("--list-ignored", action="store_true", help="print the ignored-key patterns and exit")
    return ap


@cli.command(build_parser)
def main(args: argparse.Namespace, ap: cli.Parser) -> int:
    cli.setup_logging()
    if args.list_ignored:
        print("\n".join(IGNORED_PATTERNS))
        return 0
    if bool(args.diad_ckpt) == bool(args.sd_ckpt):
        ap.error("give exactly one of --diad-ckpt or --sd-ckpt")
    if args.vae_ckpt and not args.sd_ckpt:
        ap.error("--vae-ckpt goes with --sd-ckpt")
    if args.out.exists() and not args.overwrite:
        raise ConfigError(f"--out {args.out} exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    config = ModelConfig.from_spec(args.config, "config")
    if args.only_mid_control is not None:
        config = dataclasses.replace(config, only_mid_control=args.only_mid_control == "true")
    allow = dict(allow_missing=args.allow_missing, allow_unexpected=args.allow_unexpected,
                 allow_non_finite=args.allow_non_finite)
    ctx = (pipeline.load_prompt_context(args.prompt_context, config, args.allow_non_finite)
           if args.prompt_context else None)
    if args.diad_ckpt:
        log.info("reading %s", args.diad_ckpt)
        sd = read_state_dict(args.diad_ckpt, args.unsafe_pickle)
        conv = pipeline.convert_diad(sd, config, source=str(args.diad_ckpt), prompt_context=ctx,
                                     consume=True, **allow)
        sources, kind = {"diad_ckpt": str(args.diad_ckpt)}, "detector"
    else:
        log.info("reading %s", args.sd_ckpt)
        sd = read_state_dict(args.sd_ckpt, args.unsafe_pickle)
        vae = read_state_dict(args.vae_ckpt, args.unsafe_pickle) if args.vae_ckpt else None
        conv = pipeline.convert_start_of_training(
            sd, vae, config, seed=args.seed, sd_source=str(args.sd_ckpt),
            vae_source=str(args.vae_ckpt), prompt_context=ctx, consume=True, **allow)
        sources = {"sd_ckpt": str(args.sd_ckpt), "vae_ckpt": str(args.vae_ckpt) if args.vae_ckpt else None}
        kind = "init"
    if args.resnet:
        log.info("reading %s", args.resnet)
        conv.resnet, conv.reports["resnet"] = pipeline.convert_resnet(
            read_state_dict(args.resnet, args.unsafe_pickle), source=str(args.resnet), **allow)
        sources["resnet"] = str(args.resnet)
    elif conv.resnet is None:
        conv.notes.append("no ResNet-50 weights: scoring will use a randomly initialised feature extractor "
                          "unless --resnet is given")
    t_conv = time.perf_counter() - t0
    save_model(args.out, config=config, params=conv.params, context=conv.context, resnet=conv.resnet, kind=kind,
               metadata={"sources": sources, "converted_at": time.strftime("%Y-%m-%d %H:%M:%S")},
               overwrite=args.overwrite)
    log.info("converted in %.1fs, written in %.1fs to %s\n%s", t_conv, time.perf_counter() - t0 - t_conv,
             args.out, pipeline.summarize(conv))
    return 0

