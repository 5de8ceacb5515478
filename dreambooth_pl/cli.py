"""`python -m dreambooth_pl <command>`: fit/validate/test/predict through LightningCLI, the project's commands beside."""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from .commands import COMMANDS
from .config import PROG, lightning_cli

LIGHTNING_COMMANDS = {
    "fit": "fine-tune on a subject: class images, two-term loss, evaluation, exports (--config experiments/...)",
    "validate": "LightningCLI validate with the same config",
    "test": "LightningCLI test with the same config",
    "predict": "LightningCLI predict with the same config",
}


def build_parser() -> argparse.ArgumentParser:
    """The program's parser: every command with its help; fit and the other Lightning commands parse their own."""
    p = argparse.ArgumentParser(
        prog=PROG, description="DreamBooth fine-tuning of Stable Diffusion with PyTorch Lightning. "
        "`<command> --help` explains a command's options (fit: every config key).")
    sub = p.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, text in LIGHTNING_COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    for name, (add_args, run, text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=text, description=run.__doc__)
        add_args(cmd)
        cmd.set_defaults(run=run)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # On CPU, denormal floats (common in random-initialised models) make conv/matmul up to 30x slower;
    # flushing them to zero changes no result that matters.
    torch.set_flush_denormal(True)
    # The VAE and text encoder are frozen in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
    if argv and argv[0] in LIGHTNING_COMMANDS:
        lightning_cli(argv)
        return
    args = build_parser().parse_args(argv)
    args.run(args)
