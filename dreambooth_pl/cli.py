"""`python -m dreambooth_pl <command>`: fit/validate/test/predict through LightningCLI, the project's commands beside."""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from .commands import COMMANDS
from .components import ModelLoadError
from .config import PROG, lightning_cli
from .data import DataError
from .encoders import EncoderLoadError
from .judge import JudgeLoadError
from .module import NonFiniteLossError
from .priors import PriorCacheError

# Errors whose message says what is wrong and how to fix it: printed alone, without a traceback (--debug shows it).
# ValueError covers the config checks (module, data module, callbacks), which name the key and the fix.
USER_ERRORS = (DataError, ModelLoadError, EncoderLoadError, JudgeLoadError, PriorCacheError, NonFiniteLossError,
               ValueError, FileNotFoundError)

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
        "`<command> --help` explains a command's options (fit: every config key). Errors print one message; "
        "add --debug anywhere for the traceback.")
    sub = p.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, text in LIGHTNING_COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    for name, (add_args, run, text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=text, description=run.__doc__)
        add_args(cmd)
        cmd.set_defaults(run=run)
    return p


def main(argv: list[str] | None = None) -> None:
    """Run a command; a user error (bad photos, config, model path) ends in one message and exit status 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        run(argv if not debug else [a for a in argv if a != "--debug"])
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"error: {err}\n(run again with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)


def run(argv: list[str]) -> None:
    """Dispatch to LightningCLI (fit, validate, test, predict) or to a project command."""
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
