"""The commands that take fit's arguments: `experiment` (class images -> fit -> report, from one parse of the configs)
and `priors` (the class images alone). Both read the class-image settings from the run's data module, the one place
their cache key comes from, so an override given once (`--data.num_class_images 50`) reaches every step."""

from __future__ import annotations

import sys
from pathlib import Path

from .config import DEFAULT_INSTANCE_DIR, data_module, lightning_cli, parse_fit_args, subject_folders
from .data import list_images
from .module import optional_optimizer_package
from .report import report_run

USAGE = {
    "experiment": "the whole study from one parse of the configs: class-prior images (Lightning prediction on the "
                  "run's devices, cached) -> fit (evaluation before/after, probe, exports) -> report.md. Takes fit's "
                  "arguments (--config files, --key value overrides, --ckpt_path last to resume).",
    "priors": "make the run's class-prior images once (content-keyed cache/priors/<key>/, resumable; "
              "--trainer.devices N shards them over N GPUs); fit reuses them. Takes fit's arguments.",
}


def _help(command: str, args: list[str]) -> list[str]:
    """`<command> --help`: what the command does, then fit's options (which it takes)."""
    if "-h" in args or "--help" in args:
        print(f"{command}: {USAGE[command]}\nIts options are fit's:\n")
    return args


def _check_photos(fit) -> None:
    """Every subject's photos, before any model loads or class image is made (a wrong folder fails fast)."""
    d = fit.data
    if d.instance_dir != DEFAULT_INSTANCE_DIR or d.get("subjects"):  # a config without a subject needs no photos
        for folder in subject_folders(d):
            list_images(folder, min_size=d.min_image_size)


def _make_priors(fit) -> None:
    """The run's class images by Lightning prediction on the run's accelerator and devices."""
    if not fit.data.with_prior_preservation:
        print("data.with_prior_preservation is false: no class images to make", file=sys.stderr)
        return
    trainer_kwargs = {"accelerator": fit.trainer.accelerator, "devices": fit.trainer.devices}
    for _, result in data_module(fit).make_class_images(trainer_kwargs=trainer_kwargs):
        print(result)


def priors(args: list[str]) -> None:
    """Make the class images that `fit` with the same arguments uses."""
    fit = parse_fit_args(_help("priors", args)).fit
    _check_photos(fit)
    _make_priors(fit)


def experiment(args: list[str]) -> None:
    """Class images -> fit -> report, all from one parse of the arguments."""
    cfg = parse_fit_args(_help("experiment", args))
    _check_photos(cfg.fit)
    optional_optimizer_package(cfg.fit.model.optim.optimizer)  # a missing package is said before any work
    _make_priors(cfg.fit)
    cli = lightning_cli(cfg)  # fit, from the same parsed config (its data module finds the class images made)
    out = Path(cli.config.fit.output_dir)
    if not cli.trainer.is_global_zero or cli.trainer.interrupted:
        return
    if not ((out / "metrics.json").is_file() or any(out.glob("subjects/*/metrics.json"))):
        print(f"{out} has no scores (evaluation is off: eval.evaluate_base and eval.final): no report written")
        return
    for path in report_run(out):
        print(f"wrote {path}")


COMMANDS = {"experiment": experiment, "priors": priors}
