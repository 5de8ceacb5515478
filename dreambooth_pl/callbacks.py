"""Lightning callbacks: evaluation during and after training, and the work every fit ends with (record, export, probe)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
import wandb
from PIL import Image
from pytorch_lightning.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel

from .data import Subject, load_image
from .encoders import load_encoders
from .evaluation import (
    EvalPrompt,
    Protocol,
    Scored,
    check_seeds_apart,
    encoder_info,
    protocol_prompts,
    reference_rows,
    sample,
    score,
)
from .export import export_run
from .files import image_grid, write_json
from .loggers import git_sha


@dataclasses.dataclass
class _Target:
    """One subject the callback evaluates: its prompts, class prompt, photos and output folder."""

    subject: Subject
    prompts: list[EvalPrompt]
    out: Path
    photos: list[Path]
    key: str  # metric-key prefix: "" for a one-subject run, "<subject>/" otherwise
    results: dict[str, dict] = dataclasses.field(default_factory=dict)


class SampleAndScore(pl.Callback):
    """Every N steps: a few prompts, scored (val/*). Before and after training: the full DreamBench protocol.

    Writes samples/<stage>/<prompt index>_<seed>.png and metrics.json in the run folder, logs val/* to
    the loggers (ModelCheckpoint(monitor="val/dino") works) and, on W&B, a table and per-prompt grids. A run of
    several subjects scores each in <run>/subjects/<subject>/ (val/<subject>/*, and their mean as val/*).
    """

    def __init__(
        self,
        protocol: Protocol = Protocol(),
        every_n_steps: int = 200,
        subset_prompts: int = 4,
        encoders: Literal["real", "tiny", "world"] = "real",
        prompts_dir: str = "data/dreambooth",
        evaluate_base: bool = True,
        final: bool = True,
        batch_size: int = 8,
    ):
        """The callback's settings (its config group).

        Args:
            protocol: how images are made for scoring (README "Evaluation protocol")
            every_n_steps: score a fixed subset of prompts every N steps (val/*); 0 = off
            subset_prompts: prompts in that subset, spread over the list
            encoders: real = DINO ViT-S/16 + CLIP ViT-B/32 + LPIPS; tiny = random offline encoders (uncalibrated);
                world = the toy world's judge (ground truth for world subjects)
            prompts_dir: folder of prompts_object.txt / prompts_live.txt (`make data`)
            evaluate_base: score the base model before training (the "before" of before -> after)
            final: the full protocol after training
            batch_size: images sampled per batch
        """
        super().__init__()
        self.protocol = protocol
        self.every_n_steps = every_n_steps
        self.subset_prompts = subset_prompts
        self.encoders_kind = encoders
        self.prompts_dir = prompts_dir
        self.evaluate_base = evaluate_base
        self.final = final
        self.batch_size = batch_size
        self.encoders: dict | None = None
        self.targets: list[_Target] = []
        self.last_scored_step = -1

    # --------------------------------------------------------------------------------- setup

    @property
    def active(self) -> bool:
        return self.every_n_steps > 0 or self.evaluate_base or self.final

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.active:
            return
        dm = trainer.datamodule
        hp = dm.hparams
        for kind in sorted({s.subject_type for s in dm.subjects}):
            if not (Path(self.prompts_dir) / f"prompts_{kind}.txt").is_file():
                raise FileNotFoundError(
                    f"eval.prompts_dir={self.prompts_dir} has no prompts_{kind}.txt: run `make data` "
                    f"(the DreamBench prompt lists), point eval.prompts_dir at them, or turn evaluation off "
                    f"(eval.every_n_steps: 0, eval.evaluate_base: false, eval.final: false)"
                )
        run_dir, several = Path(trainer.default_root_dir), len(dm.subjects) > 1
        if not dm.images_of:
            dm.setup("fit")
        self.targets = [
            _Target(s, protocol_prompts(self.prompts_dir, s.subject_type, s.identifier, s.class_noun),
                    run_dir / "subjects" / s.subject if several else run_dir, dm.images_of[s.subject],
                    f"{s.subject}/" if several else "")
            for s in dm.subjects]
        self.prompts = self.targets[0].prompts
        p = self.protocol
        # The protocol as run (the configured one stays as set): the data's resolution unless set; PRES gets as
        # many class-prompt images as the benchmark prompts in total (4 x 25 in the paper).
        self.run_protocol = dataclasses.replace(
            p, resolution=p.resolution or hp.resolution,
            pres_images=p.pres_images if p.pres_images is not None else p.images_per_prompt * len(self.prompts))
        if hp.with_prior_preservation and any(s.class_dir is None for s in dm.subjects):  # seeds prior.seed + i
            rp = self.run_protocol
            check_seeds_apart(rp, max(rp.images_per_prompt, rp.pres_images), dm.prior.seed, dm.num_generated)
        for t in self.targets:
            f = t.out / "metrics.json"
            if f.is_file():  # resumed run: keep the base-model scores made before
                t.results = json.loads(f.read_text()).get("stages", {})

    @property
    def results(self) -> dict[str, dict]:
        """The first (in a one-subject run, the only) subject's scores by stage."""
        return self.targets[0].results if self.targets else {}

    def _ensure_encoders(self, device: torch.device) -> dict:
        if self.encoders is None:
            self.encoders = load_encoders(self.encoders_kind, device=device)
        return self.encoders

    # --------------------------------------------------------------------------------- hooks

    def on_train_start(self, trainer, pl_module) -> None:
        for t in self.targets:
            if self.evaluate_base and "base" not in t.results and trainer.global_step == 0:
                self._run_stage(trainer, pl_module, "base", t, t.prompts, full=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # With gradient accumulation this hook runs k times per optimizer step: score each step once.
        if step == self.last_scored_step:
            return
        if self.every_n_steps > 0 and 0 < step < (trainer.max_steps or -1) and step % self.every_n_steps == 0:
            self.last_scored_step = step
            scores = []
            for t in self.targets:
                # A spread-out subset: the same prompts every time, so the curve compares like with like.
                stride = max(1, len(t.prompts) // self.subset_prompts)
                subset = t.prompts[::stride][: self.subset_prompts]
                scores.append(self._run_stage(trainer, pl_module, f"step{step:06d}", t, subset, full=False))
            self._publish(trainer, scores)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.final and not trainer.interrupted:
            self._publish(trainer, [self._run_stage(trainer, pl_module, "final", t, t.prompts, full=True)
                                    for t in self.targets])

    def _publish(self, trainer, scores: list[Scored]) -> None:
        """val/* to every logger at exactly this step, and into callback_metrics for ModelCheckpoint(monitor=...).
        Several subjects: val/<subject>/* each, and val/* their mean."""
        vals = {f"val/{t.key}{k}": v for t, sc in zip(self.targets, scores, strict=True) for k, v in sc.metrics.items()}
        if len(self.targets) > 1:
            for k in scores[0].metrics:
                vals[f"val/{k}"] = sum(sc.metrics[k] for sc in scores) / len(scores)
        # Every rank gets the same numbers (rank zero scored) so checkpoint decisions agree across ranks.
        vals = trainer.strategy.broadcast(vals, src=0)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in vals.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(vals, step=trainer.global_step)

    # --------------------------------------------------------------------------------- work

    def _sample_mine(self, trainer, pl_module, jobs: list[tuple[EvalPrompt | None, int]], folder: Path,
                     class_prompt: str) -> None:
        """This rank's share of the (prompt, seed) jobs, written as <index>_<seed>.png (class_<seed>.png for PRES)."""
        mine = jobs[trainer.global_rank :: trainer.world_size]
        real = len(mine)
        if isinstance(trainer.strategy, FSDPStrategy):
            # FSDP gathers each layer's shards at every forward, a collective: every rank must run as many
            # forwards, so the shorter shares are padded with a repeat of their last job (not saved).
            mine += mine[-1:] * (-(-len(jobs) // trainer.world_size) - len(mine))
        was_training = pl_module.training
        pl_module.eval()
        with full_weights(trainer, recurse=False), pl_module.averaged():  # EMA weights when ema_decay is set
            images = sample(pl_module.parts(), [ep.prompt if ep else class_prompt for ep, _ in mine],
                            [s for _, s in mine], self.run_protocol, self.batch_size)
        pl_module.train(was_training)
        for (ep, seed), img in zip(mine[:real], images[:real], strict=True):
            img.save(folder / (f"{ep.index:02d}_{seed}.png" if ep else f"class_{seed}.png"))

    def _run_stage(self, trainer, pl_module, stage: str, target: _Target, prompts: list[EvalPrompt],
                   full: bool) -> Scored:
        """Sample `prompts` of one subject (sharded over ranks), score on rank zero, write files, log."""
        p = self.run_protocol
        seeds = [p.seed + j for j in range(p.images_per_prompt)]
        pres_seeds = [p.seed + j for j in range(p.pres_images if full else 0)]
        folder = target.out / "samples" / stage
        folder.mkdir(parents=True, exist_ok=True)
        jobs = [(ep, s) for ep in prompts for s in seeds] + [(None, s) for s in pres_seeds]
        self._sample_mine(trainer, pl_module, jobs, folder, target.subject.class_prompt)
        trainer.strategy.barrier()
        if not trainer.is_global_zero:
            return Scored(metrics={})
        groups = [(ep, seeds, [Image.open(folder / f"{ep.index:02d}_{s}.png").convert("RGB") for s in seeds])
                  for ep in prompts]
        pres = [Image.open(folder / f"class_{s}.png").convert("RGB") for s in pres_seeds] or None
        real = [load_image(p) for p in target.photos]
        scored = score(self._ensure_encoders(pl_module.device), real, groups, pres)
        if full:
            self._record(trainer, stage, target, scored)
        self._log_media(trainer, f"{target.key}{stage}", scored, groups)
        return scored

    def _record(self, trainer, stage: str, target: _Target, scored: Scored) -> None:
        target.results[stage] = {"metrics": scored.metrics, "per_prompt": scored.per_prompt,
                                 "step": trainer.global_step}
        s = target.subject
        info = encoder_info(self.encoders or {})
        payload = {
            "subject": s.subject if target.key else trainer.datamodule.hparams.subject,
            "class_noun": s.class_noun,
            "identifier": s.identifier,
            "protocol": dataclasses.asdict(self.run_protocol),
            **info,
            "real_photos": [str(p) for p in target.photos],
            "reference": reference_rows(self.encoders or {}),
            "stages": target.results,
        }
        write_json(target.out / "metrics.json", payload)
        if not info["calibrated"]:
            print("metrics.json: scores from random tiny encoders are UNCALIBRATED smoke numbers", file=sys.stderr)

    def _log_media(self, trainer, stage: str, scored: Scored, groups) -> None:
        """A row per image with its scores (W&B's table) and a grid per prompt (W&B, TensorBoard)."""
        grids = None
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):
                rows = [[r["prompt"], r["seed"], wandb.Image(img), r["dino"], r["clip_i"], r["clip_t"]]
                        for r, img in zip(scored.rows, [im for _, _, ims in groups for im in ims], strict=True)]
                logger.log_table(f"samples/{stage}", columns=["prompt", "seed", "image", "dino", "clip_i", "clip_t"],
                                 data=rows)
            if hasattr(logger, "log_image"):
                grids = grids or [image_grid(ims, cols=len(ims), size=128) for _, _, ims in groups]
                logger.log_image(f"grids/{stage}", grids, step=trainer.global_step,
                                 caption=[ep.prompt for ep, _, _ in groups])


def _seed() -> int | None:
    """The seed `seed_everything` set for this run (None when it was not called)."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed is not None else None


def _fit_done(trainer: pl.Trainer) -> bool:
    """After-fit work runs once (rank zero) and only after a fit that was not interrupted."""
    return trainer.is_global_zero and not trainer.interrupted


@contextmanager
def full_weights(trainer: pl.Trainer, recurse: bool = True) -> Iterator[None]:
    """Under FSDP, every rank gathers the model's shards for the block (read only: changes made inside are not
    written back); under every other strategy the weights are whole already. Every rank must enter it.

    `recurse=False` gathers only the root's own parameters (what is not in a wrapped layer): enough to call the
    module outside Lightning's steps, whose wrapped layers then gather themselves at each forward (a collective:
    every rank must make the same calls)."""
    if not isinstance(trainer.strategy, FSDPStrategy):
        yield
        return
    with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False, recurse=recurse):
        yield


class RunRecord(pl.Callback):
    """Writes <run folder>/run.json after fit: wall time, peak GPU memory, steps, git SHA, seed."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_fit_end(self, trainer, pl_module) -> None:
        if not _fit_done(trainer):
            return
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        write_json(Path(trainer.default_root_dir) / "run.json", {
            "fit_seconds": time.perf_counter() - self.start, "peak_gpu_memory_gb": peak,
            "steps": trainer.global_step, "git_sha": git_sha(), "seed": _seed()})


class ExportModel(pl.Callback):
    """After fit: the fine-tuned model into the run folder (model/ + <subject>.safetensors, or lora/ for LoRA runs): the
    best checkpoint's weights when `checkpoint.monitor` picked one, else the last; optionally every N steps too."""

    def __init__(self, enabled: bool = True, single_file: bool = True, every_n_steps: int = 0, best: bool = True):
        """The callback's settings (its config group).

        Args:
            enabled: export after fit (diffusers pipeline in <run>/model, or LoRA files in <run>/lora)
            single_file: also write <run>/<subject>.safetensors (A1111 / ComfyUI single file) for full fine-tunes
            every_n_steps: also export every N optimizer steps into <run>/exports/step<N>/ (0 = only after fit)
            best: when checkpoint.monitor picked a best checkpoint, the after-fit export is that one (its step is in
                <run>/exported.json and the report); false = the last weights
        """
        super().__init__()
        self.enabled = enabled
        self.single_file = single_file
        self.every_n_steps = every_n_steps
        self.best = best
        self._exported_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimizer steps: with gradient accumulation it repeats across micro-batches
        if not (self.enabled and self.every_n_steps and step and step % self.every_n_steps == 0) or \
                step == self._exported_step or not trainer.is_global_zero:
            return
        self._exported_step = step
        out = Path(trainer.default_root_dir) / "exports" / f"step{step:06d}"
        with pl_module.averaged():
            paths = export_run(pl_module, out, self._metadata(trainer, step), self.single_file)
        for kind, path in paths.items():
            print(f"Exported {kind} at step {step}: {path}")

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.enabled or trainer.interrupted:
            return
        with full_weights(trainer):  # every rank gathers under FSDP; rank zero writes
            if trainer.is_global_zero:
                self._export(trainer, pl_module)

    def _export(self, trainer, pl_module) -> None:
        record = {"step": trainer.global_step, "weights": "last"}
        cb = trainer.checkpoint_callback
        if self.best and cb is not None and cb.monitor and cb.best_model_path and Path(cb.best_model_path).is_file():
            ckpt = torch.load(cb.best_model_path, map_location="cpu", weights_only=True)
            pl_module.load_trained(ckpt)  # the trainable weights of the best step, and its EMA, which the export uses
            record = {"step": int(ckpt["global_step"]), "weights": "best", "checkpoint": cb.best_model_path,
                      "monitor": cb.monitor, "score": float(cb.best_model_score)}
            print(f"Exporting the best checkpoint: step {record['step']}, {cb.monitor} = {record['score']:.4f}")
        record["ema"] = pl_module.ema is not None
        meta = {**self._metadata(trainer, record["step"]), "exported": record}
        with pl_module.averaged():
            paths = export_run(pl_module, trainer.default_root_dir, meta, self.single_file)
        for kind, path in paths.items():
            print(f"Exported {kind}: {path}")
        write_json(Path(trainer.default_root_dir) / "exported.json", record)

    @staticmethod
    def _metadata(trainer, step: int) -> dict:
        dm = trainer.datamodule
        return {**dm.describe(), "resolution": dm.hparams.resolution, "steps": step, "seed": _seed(),
                "git_sha": git_sha()}


class LearningProbe(pl.Callback):
    """After fit: denoising MSE on the instance photos (fixed noise) of the base and the fine-tuned model."""

    def __init__(self, enabled: bool = False, max_images: int = 8, seed: int = 0):
        """The callback's settings (its config group).

        Args:
            enabled: run the probe after fit (logged as probe/denoising_mse_base and _tuned; per subject,
                probe/<subject>/..., in a run of several)
            max_images: instance photos scored (per subject)
            seed: seed of the fixed noise and timesteps
        """
        super().__init__()
        self.enabled = enabled
        self.max_images = max_images
        self.seed = seed
        self.results: dict[str, tuple[float, float]] = {}  # subject -> (base, fine-tuned) denoising MSE

    def on_fit_end(self, trainer, pl_module) -> None:
        # Rank zero measures and reports; under FSDP every rank computes too (each forward is a collective).
        if not self.enabled or trainer.interrupted or not (trainer.is_global_zero or
                                                           isinstance(trainer.strategy, FSDPStrategy)):
            return
        dm = trainer.datamodule
        base_model, several = pl_module.base_model(), len(dm.subjects) > 1
        for s in dm.subjects:
            # (N, 3, R, R): center-cropped, unflipped views, so the probe does not depend on augmentation.
            pixels = torch.stack([v[0] for v in dm.fixed_views("instance", limit=self.max_images, subject=s.subject)])
            prompts = [s.instance_prompt] * len(pixels)
            # Both models in the training precision (Lightning's autocast, as in the steps): a memory preset's
            # half-precision frozen UNet under fp32 adapters needs it, and the two numbers stay comparable.
            with trainer.precision_plugin.forward_context():
                with full_weights(trainer, recurse=False), pl_module.averaged():
                    tuned = pl_module.denoising_mse(pixels, prompts, seed=self.seed)
                base = base_model.denoising_mse(pixels, prompts, seed=self.seed)
            self.results[s.subject] = (base, tuned)
            if not trainer.is_global_zero:
                continue
            print(f"Denoising MSE on the instance photos{f' of {s.subject}' if several else ''} (fixed noise): "
                  f"base {base:.4f} -> fine-tuned {tuned:.4f} ({100 * (tuned - base) / base:+.1f}%)")
            key = f"probe/{s.subject}/" if several else "probe/"
            for logger in trainer.loggers:
                logger.log_metrics({f"{key}denoising_mse_base": base, f"{key}denoising_mse_tuned": tuned},
                                   step=trainer.global_step)
