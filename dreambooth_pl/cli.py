"""Command line: LightningCLI for fit/validate plus the project's own subcommands."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import WandbLogger

from . import components
from .callbacks import SampleAndScore
from .data import DreamBoothDataModule
from .module import DreamBoothModule

# LightningCLI (fit, validate, ...) handles these; everything else is a project subcommand below.
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def git_sha() -> str:
    """The checkout's commit (with `-dirty` when it has changes), or `unknown` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def wandb_online() -> bool:
    """Online only with an API key and no WANDB_MODE=offline/disabled: never wait on an unreachable server."""
    return bool(os.environ.get("WANDB_API_KEY")) and os.environ.get("WANDB_MODE", "") not in ("offline", "disabled")


class AutoWandbLogger(WandbLogger):
    """WandbLogger that runs online with WANDB_API_KEY and offline otherwise (`offline=None`), saying which."""

    def __init__(self, save_dir: str = ".", name: str | None = None, project: str = "dreambooth_pl",
                 group: str | None = None, offline: bool | None = None, log_model: bool = False, **kwargs):
        offline = not wandb_online() if offline is None else offline
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        where = (f"offline in {save_dir}/wandb (set WANDB_API_KEY to log online; `wandb sync` uploads it later)"
                 if offline else "online (WANDB_API_KEY is set)")
        print(f"W&B: logging {where}", file=sys.stderr)
        super().__init__(name=name, save_dir=save_dir, project=project, group=group, offline=offline,
                         log_model=log_model, **kwargs)


class LogConfigCallback(SaveConfigCallback):
    """Writes config.yaml into the run folder and makes the parsed config the W&B run config."""

    def save_config(self, trainer, pl_module, stage) -> None:
        if trainer.logger is not None:
            cfg = self.config.as_dict()
            cfg.pop("config", None)  # the list of YAML paths; the merged values are what count
            trainer.logger.log_hyperparams({"config": cfg, "git_sha": git_sha(), "method": "dreambooth"})


class DreamBoothCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--output_dir", type=str | None, default=None, help="run folder; default outputs/<data.subject>")
        parser.add_argument("--export", type=bool, default=True, help="export a diffusers pipeline to <output_dir>/model after fit")
        parser.add_argument("--export_single_file", type=bool, default=True,
                            help="also write <output_dir>/model.safetensors (A1111/ComfyUI single file) for full fine-tunes")
        parser.add_argument("--probe_learning", type=bool, default=False,
                            help="after fit, print the denoising MSE of base vs fine-tuned model on the instance photos")
        # Callbacks as config groups (`checkpoint:`, `eval:`): an overlay changes one setting, not the whole list.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(SampleAndScore, "eval")
        parser.link_arguments("seed_everything", "data.seed")
        parser.link_arguments("model.cache_latents", "data.cache_latents")  # data then skips decoding images
        # Class images are made with the model being fine-tuned: one setting, read by both.
        for src, dst in (("pretrained", "model"), ("revision", "revision"), ("variant", "variant"),
                         ("single_file_config", "single_file_config")):
            parser.link_arguments(f"model.{src}", f"data.prior_{dst}")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        subject = cfg.data.subject
        out = Path(cfg.output_dir or Path("outputs") / subject)
        cfg.output_dir = str(out)
        cfg.trainer.default_root_dir = str(out)
        if "weights_only" in cfg and cfg.weights_only is None:
            cfg.weights_only = True  # checkpoints hold tensors and plain values only: load them safely
        # The run folder and run name follow the subject unless the config sets them.
        for logger in _as_list(cfg.trainer.logger):
            args = getattr(logger, "init_args", None)
            if args is not None and "save_dir" in args and args.save_dir in (None, "."):
                args.save_dir = str(out)
            if args is not None and "name" in args and args.name is None:
                args.name = subject
            if args is not None and "group" in args and args.group is None:
                args.group = subject  # the subject's DreamBooth and InstructPix2Pix runs side by side
        if cfg.checkpoint.dirpath is None:
            cfg.checkpoint.dirpath = str(out / "checkpoints")

    def before_fit(self) -> None:
        self._fit_start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def after_fit(self) -> None:
        cfg = self.config.fit
        if not self.trainer.is_global_zero or self.trainer.interrupted:
            return
        out = Path(cfg.output_dir)
        from .callbacks import write_json

        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        write_json(out / "run.json", {"fit_seconds": time.perf_counter() - self._fit_start, "peak_gpu_memory_gb": peak,
                                      "steps": self.trainer.global_step, "git_sha": git_sha(),
                                      "seed": cfg.seed_everything})
        dm = self.datamodule
        if cfg.export:
            meta = dict(
                subject=dm.hparams.subject, class_noun=dm.hparams.class_noun, identifier=dm.hparams.identifier,
                instance_prompt=dm.instance_prompt, class_prompt=dm.class_prompt, steps=self.trainer.global_step,
                seed=cfg.seed_everything, git_sha=git_sha(),
            )
            from .export import export_lora, export_single_file, has_lora

            if has_lora(self.model.unet) or has_lora(self.model.text_encoder):
                paths = export_lora(self.model, out / "lora")
                print(f"Exported LoRA: {paths['diffusers']} (pipe.load_lora_weights) and {paths['kohya']} (A1111/ComfyUI)")
            else:
                path = self.model.export(out / "model", metadata=meta)
                print(f"Exported the fine-tuned pipeline to {path} (StableDiffusionPipeline.from_pretrained loads it)")
                if cfg.export_single_file:
                    single = export_single_file(self.model, out / "model.safetensors",
                                                metadata={k: str(v) for k, v in meta.items()})
                    print(f"Exported {single} (one fp16 file in the original layout: A1111, ComfyUI, from_single_file)")
        if cfg.probe_learning:
            from .module import learning_probe

            base, tuned = learning_probe(self.model, dm)
            print(f"Denoising MSE on the instance photos (fixed noise): base {base:.4f} -> fine-tuned {tuned:.4f} "
                  f"({100 * (tuned - base) / base:+.1f}%)")
            for logger in self.trainer.loggers:
                logger.log_metrics({"probe/denoising_mse_base": base, "probe/denoising_mse_tuned": tuned},
                                   step=self.trainer.global_step)


def _lightning_cli(args: list[str] | None = None, run: bool = True) -> DreamBoothCLI:
    try:
        return DreamBoothCLI(
            DreamBoothModule,
            DreamBoothDataModule,
            save_config_callback=LogConfigCallback,
            auto_configure_optimizers=False,  # the optimizer is model config (model.learning_rate, ...)
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
            parser_kwargs={"default_env": False, "allow_abbrev": False},
        )
    finally:
        finish_wandb()


def finish_wandb() -> None:
    """Close the W&B run, also after a failure, so its log is complete and the next run in this process is new."""
    import wandb

    if wandb.run is not None:
        wandb.finish()


class _ParseOnlyCLI(DreamBoothCLI):
    def instantiate_classes(self) -> None:
        pass


def parse_config(args: list[str]):
    """Parse and validate a config (YAML files + overrides) without building the model or trainer."""
    return _ParseOnlyCLI(
        DreamBoothModule, DreamBoothDataModule, save_config_callback=None, auto_configure_optimizers=False, args=args, run=False,
        parser_kwargs={"default_env": False, "allow_abbrev": False},
    ).config


def _as_list(x) -> list:
    return x if isinstance(x, list) else [] if x in (None, True, False) else [x]


def _tiny_model(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m dreambooth_pl tiny-model", description="Write a tiny random Stable Diffusion (diffusers layout).")
    p.add_argument("dir", help="output folder")
    p.add_argument("--arch", default=components.TINY, choices=components.TINY_MODELS)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    path = components.build_random(a.arch, a.dir, seed=a.seed)
    print(f"Wrote the tiny random model ({a.arch}, seed {a.seed}) to {path}; random weights: for tests and demos only.")


def _priors(argv: list[str]) -> None:
    from . import priors

    p = argparse.ArgumentParser(
        prog="python -m dreambooth_pl priors",
        description="Generate class-prior images once into the content-keyed cache (or --out). Settings not given "
        "come from the fit configs (--config ...), so `fit` with the same configs reuses these images.",
    )
    p.add_argument("--config", action="append", default=[], help="fit config files (base.yaml, subject, tiny.yaml)")
    p.add_argument("--model", help="hub id, diffusers folder, .safetensors file or tiny (default: model.pretrained)")
    p.add_argument("--class-prompt", help="default: 'a <data.class_noun>'")
    p.add_argument("--num-images", type=int, help="default: data.num_class_images")
    p.add_argument("--out", help="folder; default cache/priors/<key of the settings>")
    p.add_argument("--negative-prompt")
    p.add_argument("--sampler", choices=components.SAMPLERS)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--resolution", type=int)
    p.add_argument("--seed", type=int, help="image i uses seed + i")
    p.add_argument("--batch-size", type=int, help="default: as large as GPU memory allows (4 on CPU)")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="auto", help="GPUs to shard over (Lightning DDP)")
    p.add_argument("--precision", default=None, help="Lightning precision; default bf16-mixed on GPU, 32-true on CPU")
    a = p.parse_args(argv)
    d = m = None
    if a.config:
        cfg = parse_config([x for c in a.config for x in ("--config", c)])
        d, m = cfg.data, cfg.model
    def pick(flag, default):
        return flag if flag is not None else default
    model = pick(a.model, m.pretrained if m else None)
    prompt = pick(a.class_prompt, f"a {d.class_noun}" if d else None)
    if model is None or prompt is None:
        p.error("give --config files or both --model and --class-prompt")
    settings = priors.PriorSettings(
        model=model, prompt=prompt,
        revision=m.revision if m and a.model is None else None,
        variant=m.variant if m and a.model is None else None,
        single_file_config=m.single_file_config if m and a.model is None else None,
        negative_prompt=pick(a.negative_prompt, d.prior_negative_prompt if d else ""),
        sampler=pick(a.sampler, d.prior_sampler if d else "dpm++"),
        steps=pick(a.steps, d.prior_steps if d else 25),
        guidance_scale=pick(a.guidance, d.prior_guidance_scale if d else 7.5),
        resolution=pick(a.resolution, d.resolution if d else 512),
        base_seed=pick(a.seed, d.prior_seed if d else 0),
    )
    out = pick(a.out, d.class_dir if d else None)
    tk = dict(accelerator=a.accelerator, devices=a.devices)
    if a.precision:
        tk["precision"] = a.precision
    result = priors.generate(settings, pick(a.num_images, d.num_class_images if d else 200), folder=out,
                             batch_size=pick(a.batch_size, d.prior_batch_size if d else None), trainer_kwargs=tk)
    print(result)


def _dreambench_files(argv: list[str]) -> None:
    from .data import write_benchmark_files

    p = argparse.ArgumentParser(prog="python -m dreambooth_pl dreambench-files",
                                description="Write subjects.csv and prompts_{object,live}.txt into a clone of the DreamBooth dataset repo.")
    p.add_argument("root")
    for path in write_benchmark_files(p.parse_args(argv).root):
        print(f"wrote {path}")


def _evaluate(argv: list[str]) -> None:
    import json

    import torch

    from .callbacks import FILE_RE, PAPER_ROWS, protocol_prompts, real_vs_real, score, write_json
    from .data import list_images, load_image
    from .encoders import load_encoders

    p = argparse.ArgumentParser(
        prog="python -m dreambooth_pl evaluate",
        description="Score a folder of generated images against a subject's photos with the DreamBench protocol "
        "(DINO, CLIP-I, CLIP-T with and without the identifier, DIV; PRES from class_<seed>.png files). "
        "Images are named <prompt index>_<seed>.png, the index into prompts_<type>.txt, as `fit` writes them.",
    )
    p.add_argument("--images", help="folder of generated images (<prompt index>_<seed>.png, class_<seed>.png)")
    p.add_argument("--subject", required=True, help="folder of the subject's real photos")
    p.add_argument("--class-noun", help="class noun in the prompts, e.g. 'can'")
    p.add_argument("--type", default="object", choices=("object", "live"), help="which DreamBench prompt list")
    p.add_argument("--identifier", default="sks")
    p.add_argument("--prompts-dir", default="data/dreambooth", help="folder holding prompts_object.txt / prompts_live.txt")
    p.add_argument("--encoders", default="real", choices=("real", "tiny"), help="tiny: offline random encoders (uncalibrated)")
    p.add_argument("--real-vs-real", action="store_true", help="score the photos against each other (paper's real-image row)")
    p.add_argument("--out", default=None, help="metrics.json path (default: <images>/metrics.json or <subject>/.. )")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    enc = load_encoders(a.encoders, device=device)
    real = [load_image(x) for x in list_images(a.subject)]
    info = {"subject": a.subject, "encoders": {k: getattr(v, "name", k) for k, v in enc.items()},
            "calibrated": all(getattr(v, "calibrated", False) for v in enc.values()), "reference": PAPER_ROWS}
    if a.real_vs_real:
        result = {**info, "real_vs_real": real_vs_real(enc, real), "num_photos": len(real)}
        out = Path(a.out or "metrics_real_vs_real.json")
    else:
        if not a.images or not a.class_noun:
            p.error("--images and --class-noun are required (or --real-vs-real)")
        prompts = {ep.index: ep for ep in protocol_prompts(a.prompts_dir, a.type, a.identifier, a.class_noun)}
        groups: dict[int, list[tuple[int, Path]]] = {}
        for f in sorted(Path(a.images).iterdir()):
            mt = FILE_RE.match(f.name)
            if mt:
                groups.setdefault(int(mt.group(1)), []).append((int(mt.group(2)), f))
        if not groups:
            sys.exit(f"no <prompt index>_<seed>.png files in {a.images}: name generated images so")
        bad = sorted(set(groups) - set(prompts))
        if bad:
            sys.exit(f"{a.images} has images for prompt indices {bad} but prompts_{a.type}.txt has {len(prompts)} prompts")
        triples = [(prompts[i], [s for s, _ in sorted(g)], [load_image(f) for _, f in sorted(g)]) for i, g in sorted(groups.items())]
        pres = [load_image(f) for f in sorted(Path(a.images).glob("class_*.png"))] or None
        scored = score(enc, real, triples, pres)
        result = {**info, "images": a.images, "metrics": scored.metrics, "per_prompt": scored.per_prompt, "rows": scored.rows}
        out = Path(a.out or Path(a.images) / "metrics.json")
    write_json(out, result)
    print(json.dumps(result.get("metrics", result.get("real_vs_real")), indent=2))
    if not result["calibrated"]:
        print("(tiny random encoders: uncalibrated smoke numbers)")
    print(f"wrote {out}")


def _report(argv: list[str]) -> None:
    from .report import aggregate, write_report

    p = argparse.ArgumentParser(prog="python -m dreambooth_pl report",
                                description="Write report.md + figures for run folders; with --aggregate, one DreamBench table.")
    p.add_argument("runs", nargs="+", help="run folders (outputs/<subject>)")
    p.add_argument("--aggregate", default=None, help="write a mean ± 95%% CI table over the runs to this file")
    a = p.parse_args(argv)
    if a.aggregate:
        print(f"wrote {aggregate([Path(r) / 'metrics.json' for r in a.runs], a.aggregate)}")
    else:
        for r in a.runs:
            print(f"wrote {write_report(r)}")


def _compare(argv: list[str]) -> None:
    from .instructpix2pix import DEFAULT_MODEL, compare
    from .report import aggregate_compare

    p = argparse.ArgumentParser(
        prog="python -m dreambooth_pl compare",
        description="InstructPix2Pix on a DreamBooth run's subject, prompts, seeds and metrics; writes <run>/compare/report.md.",
    )
    p.add_argument("runs", nargs="+", help="DreamBooth run folders (outputs/<subject>)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="InstructPix2Pix hub id, folder, or tiny-ip2p (offline)")
    p.add_argument("--encoders", default=None, choices=("real", "tiny"), help="default: the run's eval.encoders")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--guidance", type=float, default=7.5, help="text guidance")
    p.add_argument("--image-guidance", type=float, default=1.5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--aggregate", default=None, help="only aggregate the runs' compare/metrics.json into this table")
    a = p.parse_args(argv)
    if a.aggregate:
        print(f"wrote {aggregate_compare([Path(r) / 'compare' / 'metrics.json' for r in a.runs], a.aggregate)}")
        return
    for r in a.runs:
        path = compare(r, model=a.model, encoders=a.encoders, steps=a.steps, guidance_scale=a.guidance,
                       image_guidance_scale=a.image_guidance, batch_size=a.batch_size)
        print(f"wrote {path}")


COMMANDS = {"compare": _compare, "tiny-model": _tiny_model, "priors": _priors, "dreambench-files": _dreambench_files,
            "evaluate": _evaluate, "report": _report}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # On CPU, denormal floats (common in random-initialised models) make conv/matmul up to 30x slower;
    # flushing them to zero changes no result that matters.
    torch.set_flush_denormal(True)
    # The VAE and text encoder are frozen in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
    if argv and argv[0] in COMMANDS:
        COMMANDS[argv[0]](argv[1:])
        return
    if argv and not argv[0].startswith("-") and argv[0] not in LIGHTNING_SUBCOMMANDS:
        sys.exit(f"unknown command {argv[0]!r}: choose one of {', '.join(LIGHTNING_SUBCOMMANDS + tuple(COMMANDS))}")
    _lightning_cli(argv)
