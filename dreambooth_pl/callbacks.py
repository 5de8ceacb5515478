"""Sample the DreamBench prompts and score them (DINO, CLIP-I, CLIP-T, PRES, DIV) during and after training."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from PIL import Image

from . import components
from .data import benchmark_prompts, load_image

# DreamBooth paper, Table 1 (mean over the 30 DreamBench subjects).
PAPER_ROWS = {
    "Real images (paper)": {"dino": 0.774, "clip_i": 0.885},
    "Stable Diffusion, DreamBooth (paper)": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
}
METRIC_KEYS = ("dino", "clip_i", "clip_t", "clip_t_no_token", "pres", "div")
FILE_RE = re.compile(r"^(\d+)_(\d+)\.png$")  # samples/<stage>/<prompt index>_<seed>.png


@dataclass
class EvalPrompt:
    """One benchmark prompt: with the identifier (for sampling and CLIP-T) and without it."""

    index: int
    prompt: str
    prompt_no_token: str
    template: str = ""


def protocol_prompts(prompts_dir: str | Path, subject_type: str, identifier: str, class_noun: str) -> list[EvalPrompt]:
    """The 25 DreamBench prompts of the subject's type ({0} identifier, {1} class noun)."""
    f = Path(prompts_dir) / f"prompts_{subject_type}.txt"
    with_token = benchmark_prompts(f, identifier, class_noun)
    no_token = benchmark_prompts(f, "", class_noun)
    templates = [t.strip() for t in f.read_text(encoding="utf-8").splitlines() if t.strip()]
    return [EvalPrompt(i, a, b, t) for i, (a, b, t) in enumerate(zip(with_token, no_token, templates, strict=True))]


@dataclass
class Protocol:
    """How images are made for scoring; stored with every metrics.json."""

    images_per_prompt: int = 4
    seed: int = 0  # image k of every prompt uses seed + k
    steps: int = 25
    guidance_scale: float = 7.5
    sampler: str = "dpm++"
    resolution: int = 512
    pres_images: int = 100  # images of the plain class prompt for PRES (4 x 25 prompts)


@torch.inference_mode()
def sample(parts: components.SDComponents, prompts: list[str], seeds: list[int], protocol: Protocol,
           batch_size: int = 8) -> list[Image.Image]:
    """One image per (prompt, seed) pair, each from its own CPU generator (same noise on any device)."""
    pipe = components.pipeline(parts, sampler=protocol.sampler)
    out: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        p, s = prompts[start : start + batch_size], seeds[start : start + batch_size]
        out += pipe(prompt=p, num_inference_steps=protocol.steps, guidance_scale=protocol.guidance_scale,
                    height=protocol.resolution, width=protocol.resolution,
                    generator=[torch.Generator("cpu").manual_seed(x) for x in s], output_type="pil").images
    return out


@dataclass
class Scored:
    """Scores of one stage: means per metric, per-prompt means and per-image rows."""

    metrics: dict[str, float]
    per_prompt: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)


@torch.inference_mode()
def score(encoders: dict, real: list[Image.Image], groups: list[tuple[EvalPrompt, list[int], list[Image.Image]]],
          class_images: list[Image.Image] | None = None, class_prompt: str | None = None) -> Scored:
    """DINO / CLIP-I / CLIP-T (with and without the identifier) / DIV over prompt groups, PRES over class images."""
    from .metrics import MeanValue, PairedCosine, PairwiseCosine, within_group_pairs

    dino_real = encoders["dino"].encode_images(real)  # (R, Dd)
    clip_real = encoders["clip"].encode_images(real)  # (R, Dc)
    m = {k: (PairwiseCosine() if k in ("dino", "clip_i", "pres") else PairedCosine() if k.startswith("clip_t") else MeanValue())
         for k in METRIC_KEYS}
    per_prompt, rows = [], []
    for ep, seeds, images in groups:
        d = encoders["dino"].encode_images(images)  # (k, Dd)
        c = encoders["clip"].encode_images(images)  # (k, Dc)
        t = encoders["clip"].encode_texts([ep.prompt, ep.prompt_no_token])  # (2, Dc)
        # Fresh per-prompt metrics for the table; the stage metrics accumulate sums and counts.
        p = {k: type(m[k])() for k in ("dino", "clip_i", "clip_t", "clip_t_no_token", "div")}
        for mm in (m, p):
            mm["dino"].update(dino_real, d)
            mm["clip_i"].update(clip_real, c)
            mm["clip_t"].update(t[:1].expand_as(c), c)
            mm["clip_t_no_token"].update(t[1:].expand_as(c), c)
        pairs = within_group_pairs(len(images))
        if pairs:
            dist = encoders["lpips"].distances([images[i] for i, _ in pairs], [images[j] for _, j in pairs])
            m["div"].update(dist)
            p["div"].update(dist)
        per_prompt.append({"index": ep.index, "prompt": ep.prompt,
                           **{k: float(v.compute()) for k, v in p.items() if k != "div" or pairs}})
        dn, cn, tn = (torch.nn.functional.normalize(x.double(), dim=-1) for x in (d, c, t))
        for j, seed in enumerate(seeds):
            rows.append({"prompt_index": ep.index, "prompt": ep.prompt, "seed": seed,
                         "dino": float((torch.nn.functional.normalize(dino_real.double(), dim=-1) @ dn[j]).mean()),
                         "clip_i": float((torch.nn.functional.normalize(clip_real.double(), dim=-1) @ cn[j]).mean()),
                         "clip_t": float(tn[0] @ cn[j])})
    if class_images:
        m["pres"].update(dino_real, encoders["dino"].encode_images(class_images))
    metrics = {k: float(v.compute()) for k, v in m.items() if k != "pres" or class_images}
    metrics = {k: v for k, v in metrics.items() if v == v}  # drop NaN (e.g. DIV with one image per prompt)
    return Scored(metrics=metrics, per_prompt=per_prompt, rows=rows)


def real_vs_real(encoders: dict, real: list[Image.Image]) -> dict[str, float]:
    """The paper's 'real images' reference: all pairs of distinct photos of the subject."""
    from .metrics import PairwiseCosine

    out = {}
    for key, enc in (("dino", encoders["dino"]), ("clip_i", encoders["clip"])):
        e = enc.encode_images(real)
        metric = PairwiseCosine()
        metric.update(e, e, exclude_self=len(real) > 1)
        out[key] = float(metric.compute())
    return out


class SampleAndScore(pl.Callback):
    """Every N steps: a few prompts, scored (val/*). Before and after training: the full DreamBench protocol.

    Writes samples/<stage>/<prompt index>_<seed>.png and metrics.json in the run folder, logs val/* to
    the loggers (ModelCheckpoint(monitor="val/dino") works) and, on W&B, a table and per-prompt grids.
    """

    def __init__(
        self,
        every_n_steps: int = 200,
        subset_prompts: int = 4,
        images_per_prompt: int = 4,
        steps: int = 25,
        guidance_scale: float = 7.5,
        sampler: str = "dpm++",
        seed: int = 0,
        encoders: str = "real",
        prompts_dir: str = "data/dreambooth",
        evaluate_base: bool = True,
        final: bool = True,
        batch_size: int = 8,
        pres_images: int | None = None,
    ):
        super().__init__()
        self.pres_images = pres_images
        self.every_n_steps = every_n_steps
        self.subset_prompts = subset_prompts
        self.encoders_kind = encoders
        self.prompts_dir = prompts_dir
        self.evaluate_base = evaluate_base
        self.final = final
        self.batch_size = batch_size
        self.protocol = Protocol(images_per_prompt=images_per_prompt, seed=seed, steps=steps,
                                 guidance_scale=guidance_scale, sampler=sampler)
        self.encoders: dict | None = None
        self.results: dict[str, dict] = {}

    # --------------------------------------------------------------------------------- setup

    @property
    def active(self) -> bool:
        return self.every_n_steps > 0 or self.evaluate_base or self.final

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.active:
            return
        dm = trainer.datamodule
        self.protocol.resolution = dm.hparams.resolution
        if not (Path(self.prompts_dir) / f"prompts_{dm.hparams.subject_type}.txt").is_file():
            raise FileNotFoundError(
                f"eval.prompts_dir={self.prompts_dir} has no prompts_{dm.hparams.subject_type}.txt: run `make data` "
                f"(the DreamBench prompt lists), point eval.prompts_dir at them, or turn evaluation off "
                f"(eval.every_n_steps: 0, eval.evaluate_base: false, eval.final: false)"
            )
        self.prompts = protocol_prompts(self.prompts_dir, dm.hparams.subject_type, dm.hparams.identifier, dm.hparams.class_noun)
        # PRES: as many class-prompt images as the benchmark prompts get in total (4 x 25 in the paper).
        self.protocol.pres_images = self.pres_images if self.pres_images is not None else (
            self.protocol.images_per_prompt * len(self.prompts))
        self.class_prompt = dm.class_prompt
        self.out = Path(trainer.default_root_dir)
        f = self.out / "metrics.json"
        if f.is_file():  # resumed run: keep the base-model scores made before
            self.results = json.loads(f.read_text()).get("stages", {})

    def _ensure_encoders(self, device: torch.device) -> dict:
        if self.encoders is None:
            from .encoders import load_encoders

            self.encoders = load_encoders(self.encoders_kind, device=device)
        return self.encoders

    def _real(self, trainer) -> list[Image.Image]:
        return [load_image(p) for p in trainer.datamodule.instance_images]

    # --------------------------------------------------------------------------------- hooks

    def on_train_start(self, trainer, pl_module) -> None:
        if self.evaluate_base and "base" not in self.results and trainer.global_step == 0:
            self._run_stage(trainer, pl_module, "base", self.prompts, full=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step % self.every_n_steps == 0 and step < (trainer.max_steps or -1):
            # A spread-out subset: the same prompts every time, so the curve compares like with like.
            stride = max(1, len(self.prompts) // self.subset_prompts)
            subset = self.prompts[::stride][: self.subset_prompts]
            scored = self._run_stage(trainer, pl_module, f"step{step:06d}", subset, full=False)
            self._publish(trainer, scored)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.final and not trainer.interrupted:
            scored = self._run_stage(trainer, pl_module, "final", self.prompts, full=True)
            self._publish(trainer, scored)

    def _publish(self, trainer, scored: Scored) -> None:
        """val/* to every logger at exactly this step, and into callback_metrics for ModelCheckpoint(monitor=...)."""
        vals = {f"val/{k}": v for k, v in scored.metrics.items()}
        # Every rank gets the same numbers (rank zero scored) so checkpoint decisions agree across ranks.
        vals = trainer.strategy.broadcast(vals, src=0)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in vals.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(vals, step=trainer.global_step)

    # --------------------------------------------------------------------------------- work

    def _run_stage(self, trainer, pl_module, stage: str, prompts: list[EvalPrompt], full: bool) -> Scored:
        """Sample `prompts` (sharded over ranks), score on rank zero, write files, log."""
        was_training = pl_module.training
        pl_module.eval()
        parts = pl_module.parts()
        k = self.protocol.images_per_prompt
        jobs = [(ep, self.protocol.seed + j) for ep in prompts for j in range(k)]
        n_pres = self.protocol.pres_images if full else 0
        jobs_pres = [(None, self.protocol.seed + j) for j in range(n_pres)]
        all_jobs = jobs + jobs_pres
        mine = all_jobs[trainer.global_rank :: trainer.world_size]
        folder = self.out / "samples" / stage
        folder.mkdir(parents=True, exist_ok=True)
        images = sample(parts, [ep.prompt if ep else self.class_prompt for ep, _ in mine], [s for _, s in mine],
                        self.protocol, self.batch_size)
        for (ep, seed), img in zip(mine, images, strict=True):
            name = f"{ep.index:02d}_{seed}.png" if ep else f"class_{seed}.png"
            img.save(folder / name)
        trainer.strategy.barrier()
        pl_module.train(was_training)
        scored = Scored(metrics={})
        if trainer.is_global_zero:
            groups = [(ep, [self.protocol.seed + j for j in range(k)],
                       [Image.open(folder / f"{ep.index:02d}_{self.protocol.seed + j}.png").convert("RGB") for j in range(k)])
                      for ep in prompts]
            pres = [Image.open(folder / f"class_{s}.png").convert("RGB") for _, s in jobs_pres] or None
            scored = score(self._ensure_encoders(pl_module.device), self._real(trainer), groups, pres)
            if full:
                self._record(trainer, stage, scored)
            self._log_media(trainer, stage, scored, groups)
        return scored

    def _record(self, trainer, stage: str, scored: Scored) -> None:
        self.results[stage] = {"metrics": scored.metrics, "per_prompt": scored.per_prompt, "step": trainer.global_step}
        enc = self.encoders or {}
        payload = {
            "subject": trainer.datamodule.hparams.subject,
            "class_noun": trainer.datamodule.hparams.class_noun,
            "identifier": trainer.datamodule.hparams.identifier,
            "protocol": asdict(self.protocol),
            "encoders": {k: getattr(v, "name", k) for k, v in enc.items()},
            "calibrated": all(getattr(v, "calibrated", False) for v in enc.values()),
            "real_photos": [str(p) for p in trainer.datamodule.instance_images],
            "reference": PAPER_ROWS,
            "stages": self.results,
        }
        write_json(self.out / "metrics.json", payload)
        if not payload["calibrated"]:
            print("metrics.json: scores from random tiny encoders are UNCALIBRATED smoke numbers", file=sys.stderr)

    def _log_media(self, trainer, stage: str, scored: Scored, groups) -> None:
        from .priors import image_grid

        for logger in trainer.loggers:
            if not hasattr(logger, "log_table"):
                continue
            import wandb

            rows = [[r["prompt"], r["seed"], wandb.Image(img), r["dino"], r["clip_i"], r["clip_t"]]
                    for r, img in zip(scored.rows, [im for _, _, ims in groups for im in ims], strict=True)]
            logger.log_table(f"samples/{stage}", columns=["prompt", "seed", "image", "dino", "clip_i", "clip_t"], data=rows)
            grids = [image_grid(ims, cols=len(ims), size=128) for _, _, ims in groups]
            logger.log_image(f"grids/{stage}", grids, caption=[ep.prompt for ep, _, _ in groups])


def write_json(path: Path, payload: dict) -> None:
    """Write JSON to a temporary name, then rename."""
    from .priors import atomic_write_text

    atomic_write_text(Path(path), json.dumps(payload, indent=2))
