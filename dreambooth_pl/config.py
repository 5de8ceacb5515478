"""The run configuration: LightningCLI over the module, the data module and the callback groups; one parser for all."""

from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path

import pytorch_lightning as pl
from jsonargparse import ArgumentParser, Namespace
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger

from .callbacks import ExportModel, LearningProbe, SampleAndScore
from .cli import PROG
from .data import DreamBoothDataModule, list_images
from .loggers import finish_wandb, git_sha
from .module import DreamBoothModule

# default_env: no DREAMBOOTH_* variable silently changes a run; allow_abbrev: `--model.learning_rat` is an error.
PARSER_KWARGS = {"prog": PROG, "default_env": False, "allow_abbrev": False}
# The model's source settings that the class images are made with: one setting, read by both.
SOURCE_KEYS = ("pretrained", "revision", "variant", "single_file_config")
# A config that names no subject (priors for a model and class noun alone) keeps this photo folder.
DEFAULT_INSTANCE_DIR = inspect.signature(DreamBoothDataModule).parameters["instance_dir"].default


class LogConfigCallback(SaveConfigCallback):
    """Writes config.yaml into the run folder (whichever logger comes first) and gives every logger the parsed config
    (the W&B run config, TensorBoard's hparams)."""

    def save_config(self, trainer, pl_module, stage) -> None:
        Path(trainer.default_root_dir).mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, Path(trainer.default_root_dir) / self.config_filename, skip_unset=False,
                         overwrite=True, multifile=False)
        cfg = self.config.as_dict()
        cfg.pop("config", None)  # the list of YAML paths; the merged values are what count
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": cfg, "git_sha": git_sha(), "method": "dreambooth"})


class DreamBoothCLI(LightningCLI):
    """LightningCLI with the callback groups (`checkpoint:`, `eval:`, `export:`, `probe:`) and the run folder."""

    check_photos = True  # before anything is built; reading a config only (parse_config) does not need them

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--output_dir", type=str | None, default=None, help="run folder; default outputs/<data.subject>")
        # Callbacks as config groups: an overlay (tiny.yaml, a preset) changes one setting, not the whole list.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(SampleAndScore, "eval")
        parser.add_lightning_class_args(ExportModel, "export")
        parser.add_lightning_class_args(LearningProbe, "probe")
        parser.link_arguments("seed_everything", "data.seed")
        parser.link_arguments("model.speed.cache_latents", "data.cache_latents")  # data then skips decoding images
        for key in SOURCE_KEYS:
            parser.link_arguments(f"model.{key}", f"data.model.{key}")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if self.check_photos:  # a wrong folder is reported before any model loads or class image is made
            for folder in subject_folders(cfg.data):
                list_images(folder, min_size=cfg.data.min_image_size)
        out = Path(cfg.output_dir or default_run_folder(cfg.data.subject))
        cfg.output_dir = str(out)
        cfg.trainer.default_root_dir = str(out)
        if "weights_only" in cfg and cfg.weights_only is None:
            cfg.weights_only = True  # checkpoints hold tensors and plain values only: load them safely
        resuming = bool(cfg.get("ckpt_path"))
        for logger in _as_list(cfg.trainer.logger):
            _default_logger_args(getattr(logger, "init_args", None), out, cfg.data.subject, resuming)
        if cfg.checkpoint.dirpath is None:
            cfg.checkpoint.dirpath = str(out / "checkpoints")


    def _instantiate_trainer(self, config: dict, callbacks: list) -> pl.Trainer:
        """The trainer, with the run's CSV log (<run>/csv/metrics.csv, which the local report reads) beside whichever
        loggers the config chose."""
        loggers = _as_list(config.get("logger"))
        if not any(isinstance(x, CSVLogger) for x in loggers):
            config["logger"] = [*loggers, CSVLogger(config["default_root_dir"], name="", version="csv")]
        return super()._instantiate_trainer(config, callbacks)


def subject_folders(data) -> list[str]:
    """The photo folders of a parsed `data:` section: each of `data.subjects`, or `data.instance_dir`."""
    return [s["instance_dir"] for s in data.get("subjects") or []] or [data.instance_dir]


def default_run_folder(subject: str) -> Path:
    """outputs/<subject>; under a W&B sweep agent outputs/sweeps/<sweep id>/<run id>, one folder (with its own
    checkpoints, samples and metrics.json) per sweep run."""
    sweep, run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    return Path("outputs") / "sweeps" / sweep / run if sweep and run else Path("outputs") / subject


def _default_logger_args(args, out: Path, subject: str, resuming: bool) -> None:
    """The run folder and run name follow the subject unless the config sets them; a resumed fit continues its
    W&B run."""
    if args is None:
        return
    if "continue_run" in args and resuming:
        args.continue_run = True
    if "save_dir" in args and args.save_dir in (None, "."):
        args.save_dir = str(out)
    if "name" in args and args.name is None:
        args.name = subject
    if "group" in args and args.group is None:
        args.group = subject  # the subject's DreamBooth and InstructPix2Pix runs side by side


def _as_list(x) -> list:
    return x if isinstance(x, list) else [] if x in (None, True, False) else [x]


def _make_cli(cls: type[DreamBoothCLI], args: list[str] | Namespace, **kwargs) -> DreamBoothCLI:
    with warnings.catch_warnings():
        # The args list *is* the command line here (main passes argv on): nothing is mixed up.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        # seed_everything defaults to 0, not Lightning's `true` (a random seed): a run is reproducible unless asked
        # otherwise, and the seed is an int that data.seed can take. The optimizer is model config (model.optim).
        return cls(DreamBoothModule, DreamBoothDataModule, args=args, parser_kwargs=PARSER_KWARGS,
                   seed_everything_default=0, auto_configure_optimizers=False, **kwargs)


def lightning_cli(args: list[str] | Namespace, run: bool = True) -> DreamBoothCLI:
    """fit / validate / test / predict with the project's config (arguments, or a config `parse_fit_args` parsed);
    the W&B run is closed afterwards, also on failure."""
    try:
        return _make_cli(DreamBoothCLI, args, run=run, save_config_callback=LogConfigCallback,
                         save_config_kwargs={"overwrite": True, "save_to_log_dir": False})
    finally:
        finish_wandb()


class _ParseOnlyCLI(DreamBoothCLI):
    """Parses and validates only: no seeding, no model, no trainer."""

    check_photos = False

    def _set_seed(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def parse_config(args: list[str]):
    """Parse and validate a config (YAML files + overrides) without building the model or trainer."""
    return _make_cli(_ParseOnlyCLI, args, run=False, save_config_callback=None).config


def parse_fit_args(args: list[str]) -> Namespace:
    """fit's arguments (YAML files + overrides), parsed and checked once: {"subcommand": "fit", "fit": config}, which
    `lightning_cli` runs as is."""
    return _make_cli(_ParseOnlyCLI, ["fit", *args], run=True, save_config_callback=None).config


def _section(fit: Namespace, key: str, cls: type):
    """One section of a parsed fit config (`model` or `data`), built alone by jsonargparse from its values."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, key)
    return parser.instantiate(parser.parse_object({key: fit[key]}))[key]


def data_module(fit: Namespace) -> DreamBoothDataModule:
    """The data module of a parsed fit config, built alone (no model loads): its photos and class images."""
    return _section(fit, "data", DreamBoothDataModule)


def module(fit: Namespace) -> DreamBoothModule:
    """The model of a parsed fit config (`model:`), loaded, without a trainer."""
    return _section(fit, "model", DreamBoothModule)


def parse_run_config(run_dir: str | Path):
    """A run's settings: its config.yaml, parsed (and checked) by the same parser as `fit`."""
    f = Path(run_dir) / "config.yaml"
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: run `make experiment SUBJECT=...` first (this command reads its run)")
    # Through the `fit` subcommand's parser: config.yaml also holds fit's own arguments (ckpt_path, weights_only).
    return parse_fit_args(["--config", str(f)]).fit
