"""`python -m dreambooth_pl <command>`: fit/validate/test/predict through LightningCLI, the project's commands beside.

Importing this module is cheap (argparse only), so `--help` answers at once; a command imports torch, Lightning and
diffusers (through `config` or `commands`) only once it is chosen.
"""

from __future__ import annotations

import argparse
import sys
import warnings

PROG = "python -m dreambooth_pl"
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
CONFIG_COMMANDS = ("experiment", "priors")  # the project's commands that take fit's arguments (experiment.py)
# The program's --help, one line per command, in this order.
HELP = {
    "fit": "fine-tune on a subject: class images, two-term loss, evaluation, exports (--config experiments/...)",
    "validate": "LightningCLI validate with the same config (val/loss_* of the base model or --ckpt_path)",
    "test": "LightningCLI test with the same config",
    "predict": "LightningCLI predict with the same config",
    "experiment": "the whole study from one parse of fit's arguments: class images -> fit -> report",
    "priors": "make the run's class-prior images once (fit's arguments; content-keyed cache); fit reuses them",
    "evaluate": "score a folder of generated images with the DreamBench protocol",
    "report": "write report.md + figures for run folders, or a DreamBench table",
    "compare": "InstructPix2Pix on a run's subject, prompts and metrics; compare report",
    "export": "turn any checkpoint (last, best, mid-run) into the full set of exports",
    "tiny-model": "write a tiny random Stable Diffusion (tests, offline demos)",
    "dreambench-files": "write subjects.csv and the prompt lists into a clone of the DreamBooth dataset",
    "world-data": "write the toy world's subjects (DreamBench layout) into data/world",
    "world-build": "train the toy world's models from scratch into models/world (make world)",
    "world-claims": "measure DreamBooth's claims in the toy world against its judge (outputs/world/claims.md)",
    "world-ablations": "DreamBooth's ablations as curves in the toy world (outputs/world/ablations.md)",
}


def build_parser(commands: dict | None = None) -> argparse.ArgumentParser:
    """The program's parser: every command with its help; `commands` (commands.COMMANDS) adds the project commands'
    own options. fit and the other Lightning commands parse their own."""
    p = argparse.ArgumentParser(
        prog=PROG, description="DreamBooth fine-tuning of Stable Diffusion with PyTorch Lightning. "
        "`<command> --help` explains a command's options (fit: every config key). Errors print one message; "
        "add --debug anywhere for the traceback.")
    sub = p.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, text in HELP.items():
        if commands is None or name not in commands:
            sub.add_parser(name, help=text, add_help=False)
            continue
        add_args, run = commands[name]
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
    except Exception as err:
        if debug or not is_user_error(err):
            raise
        print(f"error: {err}\n(run again with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)


def run(argv: list[str]) -> None:
    """Dispatch to LightningCLI (fit, validate, test, predict) or to a project command."""
    if not argv or argv[0] not in HELP:  # --help, no command or a typo: answered without the heavy imports
        build_parser().parse_args(argv)
        return
    import torch  # noqa: PLC0415 - heavy: only once a command runs

    # On CPU, denormal floats (common in random-initialised models) make conv/matmul up to 30x slower;
    # flushing them to zero changes no result that matters.
    torch.set_flush_denormal(True)
    # The VAE and text encoder are frozen in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
    if argv[0] in LIGHTNING_COMMANDS:
        from .config import lightning_cli  # noqa: PLC0415 - heavy: Lightning, the model, the data module

        lightning_cli(argv)
        return
    if argv[0] in CONFIG_COMMANDS:
        from .experiment import COMMANDS as WITH_FIT_ARGS  # noqa: PLC0415 - heavy, as above

        WITH_FIT_ARGS[argv[0]](argv[1:])
        return
    from .commands import COMMANDS  # noqa: PLC0415 - heavy: every command's dependencies

    args = build_parser(COMMANDS).parse_args(argv)
    args.run(args)


def is_user_error(err: BaseException) -> bool:
    """Errors whose message says what is wrong and how to fix it (printed alone, without a traceback). ValueError
    covers the config checks (module, data module, callbacks), which name the key and the fix."""
    from .components import ModelLoadError  # noqa: PLC0415 - loaded already by whatever raised
    from .encoders import EncoderLoadError  # noqa: PLC0415
    from .judge import JudgeLoadError  # noqa: PLC0415
    from .module import MissingPackageError, NonFiniteLossError  # noqa: PLC0415

    return isinstance(err, (ModelLoadError, EncoderLoadError, JudgeLoadError, NonFiniteLossError, MissingPackageError,
                            ValueError, FileNotFoundError))
