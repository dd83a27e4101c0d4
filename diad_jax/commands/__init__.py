"""The command-line programs, one module each (`build_parser()` and `main(argv) -> exit status`, made by
`cli.command`), and
`diad-jax`, the console entry point that dispatches to them:

    diad-jax train ...               (= python scripts/train.py ...)
    diad-jax evaluate --help

scripts/*.py and convert/*.py in a checkout are thin shims calling the same `main`. Each module is
imported only when its command runs, so `diad-jax --help` answers without loading JAX."""
from __future__ import annotations

import importlib
import sys

# command -> (module, one line for `diad-jax --help`)
COMMANDS = {
    "train": ("train", "train DiAD (one process per host on a pod)"),
    "finetune-autoencoder": ("finetune_autoencoder", "fine-tune the VAE first, as the reference does"),
    "evaluate": ("evaluate", "denoise-and-score a dataset: the seven metrics, heat maps, thresholds"),
    "predict": ("predict", "verdicts (score, map, label, mask) on a folder of new images"),
    "export": ("export", "a detector -> a folder that scores without the model code (jax.export)"),
    "convert": ("convert", "reference PyTorch checkpoints -> a Flax model checkpoint"),
    "convert-to-torch": ("convert_to_torch", "a Flax model checkpoint -> ldm-layout safetensors"),
    "demo": ("demo", "the embedded default: train and evaluate the demo model on CPU"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return ("usage: diad-jax <command> [options]   (diad-jax <command> --help for its options)\n\ncommands:\n"
            + "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """`diad-jax <command> [options]`: runs the command's `main` on the options."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"diad_jax.commands.{COMMANDS[name][0]}")
    sys.argv[0] = f"diad-jax {name}"  # argparse's prog: usage lines read "diad-jax train [-h] ..."
    return module.main(rest)
