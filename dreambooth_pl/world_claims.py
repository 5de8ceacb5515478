"""DreamBooth's claims in the toy world, measured against ground truth: the judge's reading of every generated image.

Each claim is a share of images whose attributes the judge reads as asked, per (subject, seed), then mean ± 95% CI.
The same fine-tuning (DreamBoothModule + DreamBoothDataModule + Trainer.fit) and sampling code as every run.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pytorch_lightning as pl
from PIL import Image
from tqdm.auto import tqdm

from . import components, world
from .data import DreamBoothDataModule, list_images, load_image
from .evaluation import Protocol, sample
from .files import labelled_grid, write_json, write_text
from .instructpix2pix import Edit
from .instructpix2pix import load as load_ip2p
from .instructpix2pix import run as run_ip2p
from .judge import Judge, eval_scenes, load_judge
from .judge import evaluate as evaluate_judge
from .loggers import git_sha
from .module import DreamBoothModule, Optimization
from .report import mean_ci

Variant = Literal["base", "no_prior", "class_images", "teacher"]
# ASCII labels: the grids' default font has no Greek letters.
VARIANT_LABELS = {"base": "base model", "no_prior": "DreamBooth, lambda 0", "class_images": "DreamBooth, lambda 1",
                  "teacher": "DreamBooth, teacher prior", "ip2p": "InstructPix2Pix"}
IDENTITY = ("shape", "color", "marking", "marking_color")


@dataclass(frozen=True)
class ClaimsSettings:
    """How the claims are measured (the `world-claims` command's options).

    Args:
        subjects: world subjects to fine-tune on
        seeds: fine-tuning and sampling seeds per subject
        steps: fine-tuning steps
        learning_rate: fine-tuning learning rate
        batch_size: instance photos per step (plus as many class images)
        num_class_images: class images for prior preservation
        images_per_prompt: images per benchmark template
        class_prompt_images: images of the plain class prompt ("a star") per model
        sampling_steps: DPM++ sampling steps
        guidance_scale: classifier-free guidance scale
        ip2p_steps: InstructPix2Pix sampling steps
        ip2p_guidance: InstructPix2Pix text guidance
        ip2p_image_guidance: InstructPix2Pix image guidance
        data_root: the world subjects (`world-data` writes them)
        base_prompts: held-out full prompts for the base model's claim
        judge_renders: held-out renders for the judge's accuracy
        model: the pretrained text-to-image model (the world's; `tiny` only to smoke-test the code)
        ip2p_model: the InstructPix2Pix model
    """

    subjects: tuple[str, ...] = tuple(world.SUBJECTS)
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 800  # the world's subjects need ~800 steps at 5e-4 (300: ~0-15% judged the subject; 800: ~40%)
    learning_rate: float = 5e-4
    batch_size: int = 2
    num_class_images: int = 48
    images_per_prompt: int = 4
    class_prompt_images: int = 16
    sampling_steps: int = 25
    guidance_scale: float = 5.0
    ip2p_steps: int = 25
    ip2p_guidance: float = 5.0
    ip2p_image_guidance: float = 1.5
    data_root: str = "data/world"
    base_prompts: int = 200
    judge_renders: int = 1000
    model: str = "world"
    ip2p_model: str = "world-ip2p"


def _protocol(s: ClaimsSettings) -> Protocol:
    return Protocol(steps=s.sampling_steps, guidance_scale=s.guidance_scale, sampler="dpm++", resolution=world.SIZE)


# ------------------------------------------------------------------------------------------------ judge, base model


def judge_accuracy(judge: Judge, n: int = 1000, seed: int = 10_000) -> dict[str, float]:
    """Per attribute: the share of held-out renders (random scenes, a fifth of them the subjects) read right."""
    return evaluate_judge(judge, eval_scenes(seed, n, subject_share=0.2))


def base_follows_prompts(parts: components.SDComponents, judge: Judge, s: ClaimsSettings, seed: int = 20_000) -> dict:
    """Full held-out prompts: share with every attribute right; "a <shape>": the body colours it spreads over."""
    rng = np.random.default_rng(seed)
    scenes = [world.random_scene(rng) for _ in range(s.base_prompts)]
    images = sample(parts, [world.caption(sc) for sc in scenes], list(range(len(scenes))), _protocol(s), batch_size=50)
    reads = judge.read(images)
    right = [all(r[a] == getattr(sc, a) for a in world.ATTRIBUTES) for r, sc in zip(reads, scenes, strict=True)]
    per_attr = {a: float(np.mean([r[a] == getattr(sc, a) for r, sc in zip(reads, scenes, strict=True)]))
                for a in world.ATTRIBUTES}
    colours = {}
    for shape in world.VOCAB["shapes"]:
        ims = sample(parts, [f"a {shape}"] * s.class_prompt_images, list(range(s.class_prompt_images)), _protocol(s))
        colours[shape] = sorted({r["color"] for r in judge.read(ims)})
    return {"all_right": float(np.mean(right)), "per_attribute": per_attr, "colours": colours,
            "examples": images[:8], "example_prompts": [world.caption(sc) for sc in scenes[:8]]}


# ------------------------------------------------------------------------------------------------ fine-tuning


def finetune(subject: str, variant: Variant, seed: int, s: ClaimsSettings) -> tuple[DreamBoothModule, float]:
    """A DreamBooth fine-tune of the world model on `subject` (λ = 0, class images, or the teacher prior), timed."""
    spec = world.SUBJECTS[subject]
    pl.seed_everything(seed, verbose=False)
    module = DreamBoothModule(pretrained=s.model, prior_loss="teacher" if variant == "teacher" else "class_images",
                              optim=Optimization(learning_rate=s.learning_rate, lr_warmup_steps=20))
    dm = DreamBoothDataModule(subject=subject, class_noun=spec["shape"], subject_type=world.SUBJECT_TYPE,
                              instance_dir=str(Path(s.data_root) / "dataset" / subject),
                              with_prior_preservation=variant == "class_images", num_class_images=s.num_class_images,
                              model=components.ModelSource(s.model), resolution=world.SIZE, batch_size=s.batch_size,
                              min_image_size=world.SIZE, random_flip=False, seed=seed)
    trainer = pl.Trainer(accelerator="cpu", max_steps=s.steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")  # the frozen parts, on purpose
        trainer.fit(module, datamodule=dm)
    return module.eval(), time.perf_counter() - start


def subject_prompts(subject: str, identifier: str = "sks") -> list[tuple[dict, str]]:
    """(template, prompt) for every world template: 'a sks star at night', ..."""
    shape = world.SUBJECTS[subject]["shape"]
    return [(t, t["template"].format(identifier, shape)) for t in world.TEMPLATES]


def wanted(subject: str, template: dict) -> dict[str, str]:
    """The attributes a template asks of the subject: its identity, with the template's change applied."""
    spec = world.SUBJECTS[subject]
    return {**{a: spec[a] for a in IDENTITY}, **template["change"]}


def score_reads(reads: list[dict], want: dict[str, str], change: Iterable[str],
                poses: list[dict] | None = None) -> dict[str, float]:
    """Shares of images that are the subject (identity as asked), show the asked change, keep the photos' pose."""
    identity = [all(r[a] == want[a] for a in IDENTITY) for r in reads]
    context = [all(r[k] == want[k] for k in change) for r in reads]
    both = [c for c, i in zip(context, identity, strict=True) if i]
    out = {"subject": float(np.mean(identity)), "context": float(np.mean(context)),
           "context_given_subject": float(np.mean(both)) if both else float("nan")}
    if poses is not None:  # InstructPix2Pix edits a photo: does the result keep its size and position?
        out["pose_kept"] = float(np.mean([r["size"] == p["size"] and r["position"] == p["position"]
                                          for r, p in zip(reads, poses, strict=True)]))
    return out


def sample_subject(parts: components.SDComponents, subject: str, s: ClaimsSettings, seed: int) -> dict:
    """Images of every template (identifier + class noun) and of the plain class prompt, from seeded noise."""
    prompts = subject_prompts(subject)
    seeds = [seed * 1000 + k for k in range(s.images_per_prompt)]
    flat = [p for _, p in prompts for _ in seeds]
    images = sample(parts, flat, seeds * len(prompts), _protocol(s), batch_size=44)
    k = s.images_per_prompt
    shape = world.SUBJECTS[subject]["shape"]
    cls = sample(parts, [f"a {shape}"] * s.class_prompt_images, [seed * 1000 + 500 + j for j in range(s.class_prompt_images)],
                 _protocol(s), batch_size=44)
    return {"templates": {t["template"]: images[i * k : (i + 1) * k] for i, (t, _) in enumerate(prompts)}, "class": cls}


def measure_samples(judge: Judge, subject: str, samples: dict) -> dict:
    """Judge every template's images and the class-prompt images of one model."""
    rows = {t["template"]: score_reads(judge.read(samples["templates"][t["template"]]), wanted(subject, t), t["change"])
            for t in world.TEMPLATES}
    cls_reads = judge.read(samples["class"])
    spec = world.SUBJECTS[subject]
    return {"templates": rows, "class_is_subject": float(np.mean([all(r[a] == spec[a] for a in IDENTITY) for r in cls_reads])),
            "class_colours": len({r["color"] for r in cls_reads})}


def ip2p_subject(pipe, judge: Judge, subject: str, s: ClaimsSettings, seed: int, out: Path) -> tuple[dict, dict, float]:
    """InstructPix2Pix on the subject's photos, one instruction per template: scores, images and wall time."""
    folder = Path(s.data_root) / "dataset" / subject
    photos = [load_image(p) for p in list_images(folder)]
    photo_reads = judge.read(photos)
    edits = [Edit(i, seed * 1000 + k, k % len(photos), t["instruction"])
             for i, t in enumerate(world.TEMPLATES) for k in range(s.images_per_prompt)]
    stats = run_ip2p(pipe, edits, photos, out, resolution=world.SIZE, guidance_scale=s.ip2p_guidance,
                     image_guidance_scale=s.ip2p_image_guidance, steps=s.ip2p_steps, batch_size=44)
    images, rows = {}, {}
    for i, t in enumerate(world.TEMPLATES):
        mine = [e for e in edits if e.prompt_index == i]
        ims = [Image.open(out / e.filename).convert("RGB") for e in mine]
        poses = [photo_reads[e.photo_index] for e in mine]
        rows[t["template"]] = score_reads(judge.read(ims), wanted(subject, t), t["change"], poses)
        images[t["template"]] = ims
    return {"templates": rows}, images, stats.seconds


def mean_of(values: Iterable[float]) -> tuple[float, float]:
    """Mean ± 95% CI half-width over (subject, seed) values, NaN (no image to judge) left out."""
    v = [x for x in values if x == x]
    return mean_ci(v) if v else (float("nan"), 0.0)


CATEGORIES = ("recontextualization", "property", "pose")
METHODS = ("base", "no_prior", "class_images", "teacher", "ip2p")


def category_means(run: dict, metric: str) -> dict[str, float]:
    """One run's (subject, seed) mean of `metric` over each category's templates."""
    by = {c: [run["templates"][t["template"]].get(metric, float("nan")) for t in world.TEMPLATES if t["category"] == c]
          for c in CATEGORIES}
    return {c: float(np.nanmean(v)) if any(x == x for x in v) else float("nan") for c, v in by.items()}


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Mean ± 95% CI over (subject, seed) runs: per method, category and metric; the class-prompt drift figures."""
    table = {}
    for m, rs in runs.items():
        table[m] = {metric: {c: mean_of(category_means(r, metric)[c] for r in rs) for c in CATEGORIES}
                    for metric in ("subject", "context", "context_given_subject", "pose_kept") if rs}
        if m != "ip2p":
            table[m]["class_is_subject"] = mean_of(r["class_is_subject"] for r in rs)
            table[m]["class_colours"] = mean_of(r["class_colours"] for r in rs)
    return table


def subject_grid(subject: str, samples: dict, ip2p_images: dict, path: Path, template: str, data_root: str) -> Path:
    """One template's images per method, and the class prompt's, labelled: what the claims count, to look at."""
    rows = [("photos", [load_image(p) for p in list_images(Path(data_root) / "dataset" / subject)][:4])]
    rows += [(VARIANT_LABELS[v], smp["templates"][template]) for v, smp in samples.items()]
    rows.append((VARIANT_LABELS["ip2p"], ip2p_images[template]))
    rows += [(f"{VARIANT_LABELS[v]}: a {world.SUBJECTS[subject]['shape']}", smp["class"][:4]) for v, smp in samples.items()]
    return labelled_grid(rows, f"{subject}: {template.format('sks', world.SUBJECTS[subject]['shape'])}", path,
                         size=64, label_w=260)


def run_subject(subject: str, seed: int, s: ClaimsSettings, base_parts, ip2p, judge: Judge, out: Path) -> dict:
    """Every method on one (subject, seed): judged samples, wall times, and the images of the grid."""
    samples, seconds = {"base": sample_subject(base_parts, subject, s, seed)}, {}
    for v in ("no_prior", "class_images", "teacher"):
        module, fit_s = finetune(subject, v, seed, s)
        start = time.perf_counter()
        samples[v] = sample_subject(module.parts(), subject, s, seed)
        seconds[v] = fit_s + time.perf_counter() - start
    measured = {v: measure_samples(judge, subject, smp) for v, smp in samples.items()}
    measured["ip2p"], ip2p_images, seconds["ip2p"] = ip2p_subject(ip2p, judge, subject, s, seed,
                                                                 out / "ip2p" / f"{subject}_{seed}")
    return {"measured": measured, "seconds": seconds, "samples": samples, "ip2p_images": ip2p_images}


def run_claims(s: ClaimsSettings = ClaimsSettings(), out: str | Path = "outputs/world") -> Path:
    """Measure every claim, write outputs/world/claims.json, claims.md and its grids; return claims.md."""
    out, start = Path(out), time.perf_counter()
    if not (Path(s.data_root) / "subjects.csv").is_file():
        world.write_dataset(s.data_root)
    judge = load_judge()
    base_parts = components.load_components(s.model)
    base = base_follows_prompts(base_parts, judge, s)
    ip2p = load_ip2p(s.ip2p_model)
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    seconds: dict[str, list[float]] = {m: [] for m in METHODS if m != "base"}
    grids = []
    bar = tqdm(total=len(s.subjects) * len(s.seeds), desc="claims (subject x seed)", unit="run")
    for subject in s.subjects:
        for seed in s.seeds:
            bar.set_postfix(subject=subject, seed=seed)
            r = run_subject(subject, seed, s, base_parts, ip2p, judge, out)
            bar.update()
            for m in METHODS:
                runs[m].append(r["measured"][m])
            for m, v in r["seconds"].items():
                seconds[m].append(v)
            if seed == s.seeds[0]:
                t = world.TEMPLATES[0]["template"]
                grids.append(subject_grid(subject, r["samples"], r["ip2p_images"], out / "figures" / f"{subject}.png", t,
                                          s.data_root))
    payload = {"settings": dataclasses.asdict(s), "git_sha": git_sha(), "judge_accuracy": judge_accuracy(judge, s.judge_renders),
               "base": {k: v for k, v in base.items() if k not in ("examples", "example_prompts")},
               "summary": summarize(runs), "seconds": {m: mean_of(v) for m, v in seconds.items()},
               "wall_seconds": time.perf_counter() - start}
    write_json(out / "claims.json", payload)
    return write_text(out / "claims.md", claims_markdown(payload, grids, out))


def _ci(v: tuple[float, float]) -> str:
    return "–" if v[0] != v[0] else f"{v[0]:.2f} ± {v[1]:.2f}"


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _claims_head(p: dict) -> list[str]:
    """The judge's and the base model's claims."""
    acc, base = p["judge_accuracy"], p["base"]
    lines = ["## 1. The judge reads held-out renders right (target: >= 98% per attribute)\n\n| attribute | accuracy |\n|---|---:|\n"]
    lines += [f"| {a} | {v:.3f} |\n" for a, v in acc.items()]
    lines.append(f"\n{_verdict(min(acc.values()) >= 0.98)}\n\n")
    n_col = {k: len(v) for k, v in base["colours"].items()}
    lines.append(f"## 2. The base model follows prompts (targets: every attribute right in >= 80% of images of held-out full "
                 f"prompts; \"a <shape>\" over >= 6 colours)\n\nEvery attribute right: **{base['all_right']:.3f}** "
                 f"({_verdict(base['all_right'] >= 0.8)}). Per attribute: "
                 + ", ".join(f"{a} {v:.2f}" for a, v in base["per_attribute"].items())
                 + ".\n\nBody colours of \"a <shape>\" images: " + ", ".join(f"{k} {v}" for k, v in n_col.items())
                 + f" ({_verdict(min(n_col.values()) >= 6)}).\n\n")
    return lines


def _claims_dreambooth(p: dict) -> list[str]:
    """DreamBooth learns the subject; prior preservation and language drift."""
    sm = p["summary"]
    rc = "recontextualization"
    lines = ["## 3. DreamBooth learns the subject (recontextualisation prompts; targets: base <= 5% -> fine-tuned >= 70% "
             "judged to be the subject, context right in >= 70% of those)\n\n| method | judged the subject | context right "
             "| context right, subject images |\n|---|---:|---:|---:|\n"]
    lines += [f"| {VARIANT_LABELS[m]} | {_ci(sm[m]['subject'][rc])} | {_ci(sm[m]['context'][rc])} | "
              f"{_ci(sm[m]['context_given_subject'][rc])} |\n" for m in METHODS]
    ok = sm["base"]["subject"][rc][0] <= 0.05 and sm["class_images"]["subject"][rc][0] >= 0.7 and \
        sm["class_images"]["context_given_subject"][rc][0] >= 0.7
    lines.append(f"\n{_verdict(ok)} (λ = 1)\n\n")
    lines.append("## 4. Prior preservation prevents language drift (\"a <shape>\"; targets: judged the subject with λ = 1 at "
                 "most half of λ = 0; colours with λ = 1 at least λ = 0)\n\n| method | \"a <shape>\" judged the subject | "
                 "distinct body colours |\n|---|---:|---:|\n")
    lines += [f"| {VARIANT_LABELS[m]} | {_ci(sm[m]['class_is_subject'])} | {_ci(sm[m]['class_colours'])} |\n"
              for m in METHODS if m != "ip2p"]
    drift = sm["class_images"]["class_is_subject"][0] <= 0.5 * sm["no_prior"]["class_is_subject"][0] and \
        sm["class_images"]["class_colours"][0] >= sm["no_prior"]["class_colours"][0]
    no_drift = sm["no_prior"]["class_is_subject"][0] == 0  # nothing for the prior to prevent: say so, not "met"
    lines.append(f"\n{'**not measurable**: without the prior (λ = 0) no class image is the subject' if no_drift else _verdict(drift)}"
                 f" (λ = 1 against λ = 0). The teacher prior needs no class images; it holds one frozen UNet copy "
                 f"(none with LoRA).\n\n")
    return lines


def _claims_compare(p: dict) -> list[str]:
    """InstructPix2Pix against DreamBooth per category, and wall times."""
    sm = p["summary"]
    lines = ["## 5. InstructPix2Pix against DreamBooth (per category: the asked change right, the subject kept, the photo's "
             "pose kept)\n\n| category | method | change right | subject | pose of the photo kept |\n|---|---|---:|---:|---:|\n"]
    for c in CATEGORIES:
        for m in ("class_images", "ip2p"):
            pose = _ci(sm[m]["pose_kept"][c]) if "pose_kept" in sm[m] else "–"
            lines.append(f"| {c} | {VARIANT_LABELS[m]} | {_ci(sm[m]['context'][c])} | {_ci(sm[m]['subject'][c])} | {pose} |\n")
    lines.append("\n| method | seconds per subject (fine-tune + sampling, or the edits) |\n|---|---:|\n")
    lines += [f"| {VARIANT_LABELS[m]} | {_ci(v)} |\n" for m, v in p["seconds"].items()]
    return lines


def claims_markdown(p: dict, grids: list[Path], out: Path) -> str:
    """claims.md: a table and a verdict per claim (mean ± 95% CI over subjects and seeds), the grids, the command."""
    s = p["settings"]
    lines = ["# The toy world: DreamBooth's claims against ground truth\n\n",
             f"Subjects {', '.join(s['subjects'])}; seeds {s['seeds']}; {s['steps']} fine-tuning steps at lr {s['learning_rate']}; "
             f"{s['images_per_prompt']} images per template; mean ± 95% CI over subjects x seeds. Reproduce: "
             f"`make world-claims` (git {p['git_sha']}, {p['wall_seconds'] / 60:.1f} min).\n\n"]
    lines += _claims_head(p) + _claims_dreambooth(p) + _claims_compare(p)
    lines.append("\n## Grids (first seed; rows: photos, each method on the first template, then \"a <shape>\")\n\n")
    lines += [f"![{g.stem}]({g.relative_to(out)})\n\n" for g in grids]
    return "".join(lines)
