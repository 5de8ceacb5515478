"""DreamBooth's claims in the toy world, measured against ground truth: the judge's reading of every generated image.

Every image is judged, and a claim is a rate of images judged as asked. Seeds are averaged within a subject and the
95% CI is over subjects (Student t); each rate is also pooled over all images with its Wilson interval. The fine-tunes
are `make experiment MODEL=world`'s: base.yaml + the subject + world.yaml (whose DreamBooth settings were tuned on the
validation subjects, never on the reported ones), run by the same module, data module and Trainer.fit.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import components, config, world
from .data import list_images, load_image
from .evaluation import Protocol, sample
from .files import labelled_grid, write_json, write_text
from .instructpix2pix import Edit
from .instructpix2pix import load as load_ip2p
from .instructpix2pix import run as run_ip2p
from .judge import Judge, eval_scenes, load_judge
from .judge import evaluate as evaluate_judge
from .loggers import git_sha
from .module import DreamBoothModule
from .report import mean_ci, wilson

Variant = Literal["base", "no_prior", "class_images", "teacher"]
# ASCII labels: the grids' default font has no Greek letters.
VARIANT_LABELS = {"base": "base model", "described": "base model, subject in words", "no_prior": "DreamBooth, lambda 0", "class_images": "DreamBooth, lambda 1",
                  "teacher": "DreamBooth, teacher prior", "ip2p": "InstructPix2Pix"}
# The fit arguments of each variant, on top of world.yaml's DreamBooth (which is "class_images").
VARIANT_ARGS = {"no_prior": ["--data.with_prior_preservation", "false"],
                "class_images": [],
                "teacher": ["--model.prior_loss", "teacher", "--data.with_prior_preservation", "false"]}
IDENTITY = world.IDENTITY
PARTS = tuple(f"right_{a}" for a in IDENTITY)  # judge_reads' per-attribute outcomes: which part of the subject is missing
CATEGORIES = ("recontextualization", "seen", "property", "pose")
CATEGORY_LABELS = {"recontextualization": "unseen backgrounds", "seen": "backgrounds of the photos",
                   "property": "property change", "pose": "pose change"}
# "described": the base model with the subject spelled out instead of its identifier, the reference a fine-tune must beat
METHODS = ("base", "described", "no_prior", "class_images", "teacher", "ip2p")
CONFIGS = ("experiments/base.yaml", "experiments/world.yaml")


@dataclass(frozen=True)
class ClaimsSettings:
    """How the claims are measured (the `world-claims` command's options); the DreamBooth settings are world.yaml's.

    Args:
        subjects: world subjects to fine-tune on (the reported ones; the validation ones are for tuning)
        seeds: fine-tuning and sampling seeds per subject
        fit_args: extra fit arguments over base.yaml + the subject + world.yaml (e.g. ["--trainer.max_steps", "400"])
        images_per_prompt: images per benchmark template
        class_prompt_images: images of the plain class prompt ("a star") per model
        ip2p_steps: InstructPix2Pix sampling steps
        ip2p_guidance: InstructPix2Pix text guidance
        ip2p_image_guidance: InstructPix2Pix image guidance
        data_root: the world subjects (`world-data` writes them)
        base_prompts: held-out full prompts for the base model's claim
        judge_renders: held-out renders for the judge's accuracy (on renders and on VAE round trips)
        ip2p_model: the InstructPix2Pix model
    """

    subjects: tuple[str, ...] = tuple(world.SUBJECTS)
    seeds: tuple[int, ...] = (0, 1)
    fit_args: tuple[str, ...] = ()
    images_per_prompt: int = 4
    class_prompt_images: int = 16
    ip2p_steps: int = 25
    ip2p_guidance: float = 5.0
    # 1.5 (SD's default) left the world's editor re-drawing the object: on 200 held-out renders (benchmarks/
    # world_pilots.py, 2026-12-06) pose kept 63% -> 80%, change right 65% -> 72%, no-op 16% -> 42% at 5.
    ip2p_image_guidance: float = 5.0
    data_root: str = "data/world"
    base_prompts: int = 200
    judge_renders: int = 1000
    ip2p_model: str = "world-ip2p"


def fit_config(subject: str, variant: str, seed: int, s: ClaimsSettings):
    """The parsed fit config of one fine-tune: base.yaml + the subject + world.yaml + the variant + `s.fit_args`."""
    args = [a for f in (CONFIGS[0], f"experiments/subjects/{subject}.yaml", *CONFIGS[1:]) for a in ("--config", f)]
    args += ["--data.instance_dir", str(Path(s.data_root) / "dataset" / subject), "--seed_everything", str(seed),
             *VARIANT_ARGS[variant], *s.fit_args]
    return config.parse_config(args)


def protocol(s: ClaimsSettings) -> Protocol:
    """How DreamBooth's images are sampled: world.yaml's evaluation protocol at the world's 64 px."""
    p = config.parse_config([a for f in CONFIGS for a in ("--config", f)]).eval.protocol
    return Protocol(**{**p.as_dict(), "resolution": world.SIZE})


# ------------------------------------------------------------------------------------------------ judge, base model


def judge_accuracy(judge: Judge, n: int = 1000, seed: int = 10_000) -> dict[str, float]:
    """Per attribute: the share of `n` held-out renders (a fifth of them the subjects) the judge reads right."""
    return evaluate_judge(judge, eval_scenes(seed, n, subject_share=0.2))


def round_trip_reads(judge: Judge, vae, n: int = 1000, seed: int = 10_000) -> tuple[list[world.Scene], list[dict]]:
    """The same held-out scenes and the judge's readings of their round trips through `vae` (encode, decode), which
    is all a generated image can be."""
    scenes = eval_scenes(seed, n, subject_share=0.2)
    return scenes, judge.read(round_trip(vae, [world.render(sc) for sc in scenes]))


def read_rates(reads: list[dict], scenes: list[world.Scene]) -> dict[str, float]:
    """Per attribute: the share of readings that match their scene."""
    return {a: float(np.mean([r[a] == getattr(sc, a) for r, sc in zip(reads, scenes, strict=True)]))
            for a in world.ATTRIBUTES}


def confusion(reads: list[dict], scenes: list[world.Scene], attribute: str) -> dict[str, dict[str, int]]:
    """Asked -> read -> images: which values of `attribute` the model draws for each one a prompt asks for."""
    out: dict[str, dict[str, int]] = {v: {} for v in world.ATTRIBUTES[attribute]}
    for r, sc in zip(reads, scenes, strict=True):
        row = out[getattr(sc, attribute)]
        row[r[attribute]] = row.get(r[attribute], 0) + 1
    return {k: dict(sorted(v.items(), key=lambda kv: -kv[1])) for k, v in out.items() if v}


def marking_cells(reads: list[dict], scenes: list[world.Scene]) -> dict[str, dict[str, float]]:
    """Per marking, per size: the share of images whose marking and marking colour are both read right (a thin marking
    on a small object is what an 8 px latent cell blurs first)."""
    cells: dict[str, dict[str, list[bool]]] = {}
    for r, sc in zip(reads, scenes, strict=True):
        ok = r["marking"] == sc.marking and r["marking_color"] == sc.marking_color
        cells.setdefault(sc.marking, {}).setdefault(sc.size, []).append(ok)
    return {m: {z: float(np.mean(v)) for z, v in sorted(by.items())} for m, by in sorted(cells.items())}


@torch.no_grad()
def subject_photo_reads(judge: Judge, vae, subjects: Iterable[str], data_root: str | Path) -> dict[str, dict]:
    """Per subject, (judged the subject, photos) of its photos as they are and after a round trip through `vae`:
    the round trips are the most a fine-tune on them can draw."""
    out = {}
    for subject in subjects:
        spec = world.ALL_SUBJECTS[subject]
        photos = [load_image(p) for p in list_images(Path(data_root) / "dataset" / subject)]
        out[subject] = {name: [sum(all(r[a] == spec[a] for a in IDENTITY) for r in judge.read(ims)), len(ims)]
                        for name, ims in (("photos", photos), ("round_trips", round_trip(vae, photos)))}
    return out


@torch.no_grad()
def round_trip(vae, images: list[Image.Image], batch_size: int = 250) -> list[Image.Image]:
    """Images through the VAE and back (posterior mean), as 8-bit images."""
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images[i : i + batch_size]])
        x = (x.float() / 127.5 - 1).to(vae.device, vae.dtype)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)  # (B, 3, 64, 64)
        arr = ((y.float() + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        out += [Image.fromarray(a) for a in arr]
    return out


def base_follows_prompts(parts: components.SDComponents, judge: Judge, s: ClaimsSettings, seed: int = 20_000) -> dict:
    """Full held-out prompts: share with every attribute right; "a <shape>": the body colours it spreads over."""
    rng = np.random.default_rng(seed)
    scenes = [world.random_scene(rng) for _ in range(s.base_prompts)]
    images = sample(parts, [world.caption(sc) for sc in scenes], list(range(len(scenes))), protocol(s), batch_size=50)
    reads = judge.read(images)
    right = [all(r[a] == getattr(sc, a) for a in world.ATTRIBUTES) for r, sc in zip(reads, scenes, strict=True)]
    per_attr = read_rates(reads, scenes)
    colours = {}
    for shape in world.VOCAB["shapes"]:
        ims = sample(parts, [f"a {shape}"] * s.class_prompt_images, list(range(s.class_prompt_images)), protocol(s))
        colours[shape] = sorted({r["color"] for r in judge.read(ims)})
    return {"all_right": float(np.mean(right)), "all_right_pooled": wilson(int(sum(right)), len(right)),
            "per_attribute": per_attr, "marking_confusion": confusion(reads, scenes, "marking"),
            "colours": colours, "examples": images[:8],
            "example_prompts": [world.caption(sc) for sc in scenes[:8]]}


@torch.no_grad()
def identifier_cosine(parts: components.SDComponents, class_noun: str, identifier: str = "sks") -> float:
    """Cosine of the text encoder's states (all tokens, flattened) of "a <identifier> <noun>" and "a <noun>": how
    far the rare identifier moves the prompt before fine-tuning (1 = not at all)."""
    ids = parts.tokenizer([f"a {identifier} {class_noun}", f"a {class_noun}"], padding="max_length",
                          max_length=parts.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    states = parts.text_encoder(ids.to(parts.text_encoder.device))[0].flatten(1).float()  # (2, L * D)
    return float(torch.nn.functional.cosine_similarity(states[0], states[1], dim=0))


# ------------------------------------------------------------------------------------------------ fine-tuning


def finetune(subject: str, variant: str, seed: int, s: ClaimsSettings,
             callbacks: Iterable[pl.Callback] = ()) -> tuple[DreamBoothModule, float]:
    """One DreamBooth fine-tune of the world model on `subject` with world.yaml's settings and the variant's (λ = 0,
    class images, or the teacher prior), on the CPU without loggers or files: the module (its EMA weights when
    model.optim.ema_decay is set) and the seconds it took."""
    cfg = fit_config(subject, variant, seed, s)
    pl.seed_everything(seed, verbose=False)
    module, dm = config.module(cfg), config.data_module(cfg)
    t = cfg.trainer
    trainer = pl.Trainer(accelerator="cpu", max_steps=t.max_steps, precision=t.precision,
                         gradient_clip_val=t.gradient_clip_val, accumulate_grad_batches=t.accumulate_grad_batches,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=list(callbacks))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")  # the frozen parts, on purpose
        trainer.fit(module, datamodule=dm)
    if module.ema is not None:  # the weights that evaluation and the exports use (model.optim.ema_decay)
        module.ema.copy_to(module.trainable_parameters())
    return module.eval(), time.perf_counter() - start


def subject_prompts(subject: str, identifier: str = "sks") -> list[tuple[dict, str]]:
    """(template, prompt) for every world template: 'a sks star at night', ..."""
    shape = world.ALL_SUBJECTS[subject]["shape"]
    return [(t, t["template"].format(identifier, shape)) for t in world.TEMPLATES]


def described_prompts(subject: str) -> list[tuple[dict, str]]:
    """(template, prompt) for every world template with the subject told in words instead of its identifier: 'a purple
    star with a yellow band at night'; a template's colour replaces the subject's ('a blue star with a yellow band')."""
    spec = world.ALL_SUBJECTS[subject]
    mark = world.marking_phrase(spec["marking"], spec["marking_color"])
    out = []
    for t in world.TEMPLATES:
        color = [] if "color" in t["change"] else [spec["color"]]
        words = [mark, *color, spec["shape"]] if spec["marking"] == "none" else [*color, spec["shape"], mark]
        out.append((t, t["template"].replace("{0} {1}", " ".join(words))))
    return out


def wanted(subject: str, template: dict) -> dict[str, str]:
    """The attributes a template asks of the subject: its identity, with the template's change applied."""
    spec = world.ALL_SUBJECTS[subject]
    return {**{a: spec[a] for a in IDENTITY}, **template["change"]}


def judge_reads(reads: list[dict], want: dict[str, str], change: Iterable[str],
                poses: list[dict] | None = None) -> dict[str, list[bool]]:
    """Per image: is it the subject (identity as asked), does it show the asked change, is each identity attribute
    as asked (`right_<attribute>`: which part of the subject is missing), (InstructPix2Pix, given the photos'
    readings) does it keep the photo's size and position."""
    change = list(change)
    out = {"subject": [all(r[a] == want[a] for a in IDENTITY) for r in reads],
           "context": [all(r[k] == want[k] for k in change) for r in reads],
           **{part: [r[a] == want[a] for r in reads] for part, a in zip(PARTS, IDENTITY, strict=True)}}
    if poses is not None:
        out["pose_kept"] = [r["size"] == p["size"] and r["position"] == p["position"]
                            for r, p in zip(reads, poses, strict=True)]
    return out


def sample_templates(parts: components.SDComponents, prompts: list[tuple[dict, str]], s: ClaimsSettings, seed: int,
                     proto: Protocol) -> dict[str, list[Image.Image]]:
    """`s.images_per_prompt` images of each (template, prompt), from seeded noise shared by every method."""
    seeds = [seed * 1000 + k for k in range(s.images_per_prompt)]
    images = sample(parts, [p for _, p in prompts for _ in seeds], seeds * len(prompts), proto, batch_size=52)
    k = s.images_per_prompt
    return {t["template"]: images[i * k : (i + 1) * k] for i, (t, _) in enumerate(prompts)}


def sample_subject(parts: components.SDComponents, subject: str, s: ClaimsSettings, seed: int,
                   proto: Protocol | None = None) -> dict:
    """Images of every template (identifier + class noun) and of the plain class prompt, from seeded noise."""
    proto = proto or protocol(s)
    shape = world.ALL_SUBJECTS[subject]["shape"]
    cls = sample(parts, [f"a {shape}"] * s.class_prompt_images,
                 [seed * 1000 + 500 + j for j in range(s.class_prompt_images)], proto, batch_size=52)
    return {"templates": sample_templates(parts, subject_prompts(subject), s, seed, proto), "class": cls}


def sample_described(parts: components.SDComponents, subject: str, s: ClaimsSettings, seed: int) -> dict:
    """Images of every template with the subject told in words (`described_prompts`), from sample_subject's noise."""
    return {"templates": sample_templates(parts, described_prompts(subject), s, seed, protocol(s))}


def measure_samples(judge: Judge, subject: str, samples: dict) -> dict:
    """Judge every template's images and the class-prompt images (when sampled) of one model: per-image outcomes."""
    rows = {t["template"]: judge_reads(judge.read(samples["templates"][t["template"]]), wanted(subject, t), t["change"])
            for t in world.TEMPLATES}
    if "class" not in samples:  # the base model told the subject in words: no class prompt
        return {"subject": subject, "templates": rows}
    spec = world.ALL_SUBJECTS[subject]
    cls = judge.read(samples["class"])
    return {"subject": subject, "templates": rows,
            "class": {"is_subject": [all(r[a] == spec[a] for a in IDENTITY) for r in cls],
                      "colours": [r["color"] for r in cls]}}


def ip2p_subject(pipe, judge: Judge, subject: str, s: ClaimsSettings, seed: int, out: Path,
                 guidance: float | None = None, image_guidance: float | None = None) -> tuple[dict, dict, float]:
    """InstructPix2Pix on the subject's photos, one instruction per template, plus the no-op instruction (which must
    give each photo back): per-image outcomes, the images and the wall time."""
    folder = Path(s.data_root) / "dataset" / subject
    photos = [load_image(p) for p in list_images(folder)]
    photo_reads = judge.read(photos)
    instructions = [t["instruction"] for t in world.TEMPLATES] + [world.NO_OP]
    edits = [Edit(i, seed * 1000 + k, k % len(photos), text)
             for i, text in enumerate(instructions) for k in range(s.images_per_prompt)]
    stats = run_ip2p(pipe, edits, photos, out, resolution=world.SIZE,
                     guidance_scale=s.ip2p_guidance if guidance is None else guidance,
                     image_guidance_scale=s.ip2p_image_guidance if image_guidance is None else image_guidance,
                     steps=s.ip2p_steps, batch_size=52)
    images, rows = {}, {}
    for i, text in enumerate(instructions):
        mine = [e for e in edits if e.prompt_index == i]
        ims = [Image.open(out / e.filename).convert("RGB") for e in mine]
        reads, poses = judge.read(ims), [photo_reads[e.photo_index] for e in mine]
        if text == world.NO_OP:  # the photo back: every attribute as the judge reads the photo itself
            no_op = [all(r[a] == p[a] for a in world.ATTRIBUTES) for r, p in zip(reads, poses, strict=True)]
            continue
        t = world.TEMPLATES[i]
        rows[t["template"]] = judge_reads(reads, wanted(subject, t), t["change"], poses)
        images[t["template"]] = ims
    # Edits already in `out` (a rerun resumes) are reused, not timed: no wall time unless every edit was made now.
    seconds = stats.seconds if stats.images == len(edits) else float("nan")
    return {"subject": subject, "templates": rows, "no_op": no_op}, images, seconds


# ------------------------------------------------------------------------------------------------ statistics


def counts(run: dict, metric: str, category: str) -> tuple[int, int]:
    """(k, n) of one run over a category's templates: images with `metric` true, images counted. For
    "context_given_subject" the images counted are those judged the subject."""
    k = n = 0
    for t in world.TEMPLATES:
        if t["category"] != category:
            continue
        o = run["templates"][t["template"]]
        if metric == "context_given_subject":
            both = [c for c, i in zip(o["context"], o["subject"], strict=True) if i]
            k, n = k + sum(both), n + len(both)
        elif metric in o:
            k, n = k + sum(o[metric]), n + len(o[metric])
    return k, n


def over_subjects(runs: list[dict], rate) -> dict:
    """`rate(run) -> (k, n)` summarised: seeds averaged within a subject, then mean ± 95% CI (Student t) over
    subjects; and pooled over every image, with its Wilson interval."""
    by_subject: dict[str, list[float]] = {}
    k_all = n_all = 0
    for r in runs:
        k, n = rate(r)
        k_all, n_all = k_all + k, n_all + n
        if n:
            by_subject.setdefault(r["subject"], []).append(k / n)
    means = [float(np.mean(v)) for v in by_subject.values()]
    mean, half = mean_ci(means) if means else (float("nan"), 0.0)
    return {"mean": mean, "ci": half, "subjects": len(means), "pooled": wilson(k_all, n_all), "images": n_all}


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Per method: per category and metric, and for the class prompt ("a <shape>": judged the subject, distinct body
    colours), each summarised over subjects (`over_subjects`)."""
    table = {}
    for m, rs in runs.items():
        if not rs:
            continue
        table[m] = {metric: {c: over_subjects(rs, lambda r, metric=metric, c=c: counts(r, metric, c)) for c in CATEGORIES}
                    for metric in ("subject", "context", "context_given_subject", "pose_kept", *PARTS)}
        if "class" in rs[0]:
            table[m]["class_is_subject"] = over_subjects(
                rs, lambda r: (sum(r["class"]["is_subject"]), len(r["class"]["is_subject"])))
            colours = {}
            for r in rs:
                colours.setdefault(r["subject"], []).append(len(set(r["class"]["colours"])))
            means = [float(np.mean(v)) for v in colours.values()]
            table[m]["class_colours"] = dict(zip(("mean", "ci"), mean_ci(means), strict=True))
        if "no_op" in rs[0]:
            table[m]["no_op"] = over_subjects(rs, lambda r: (sum(r["no_op"]), len(r["no_op"])))
    return table


# ------------------------------------------------------------------------------------------------ the run


def subject_grid(subject: str, samples: dict, ip2p_images: dict, path: Path, template: str, data_root: str) -> Path:
    """One template's images per method, and the class prompt's, labelled: what the claims count, to look at."""
    shape = world.ALL_SUBJECTS[subject]["shape"]
    rows = [("photos", [load_image(p) for p in list_images(Path(data_root) / "dataset" / subject)][:4])]
    rows += [(VARIANT_LABELS[v], smp["templates"][template]) for v, smp in samples.items()]
    rows.append((VARIANT_LABELS["ip2p"], ip2p_images[template]))
    rows += [(f"{VARIANT_LABELS[v]}: a {shape}", smp["class"][:4]) for v, smp in samples.items() if "class" in smp]
    return labelled_grid(rows, f"{subject}: {template.format('sks', shape)}", path, size=64, label_w=260)


def run_subject(subject: str, seed: int, s: ClaimsSettings, base_parts, ip2p, judge: Judge, out: Path) -> dict:
    """Every method on one (subject, seed): judged samples, wall times, and the images of the grid."""
    samples = {"base": sample_subject(base_parts, subject, s, seed),
               "described": sample_described(base_parts, subject, s, seed)}
    seconds = {}
    for v in ("no_prior", "class_images", "teacher"):
        module, fit_s = finetune(subject, v, seed, s)
        start = time.perf_counter()
        samples[v] = sample_subject(module.parts(), subject, s, seed)
        seconds[v] = fit_s + time.perf_counter() - start
    measured = {v: {**measure_samples(judge, subject, smp), "seed": seed} for v, smp in samples.items()}
    folder = out / "ip2p" / f"{subject}_{seed}_{s.ip2p_guidance}_{s.ip2p_image_guidance}"  # one per guidance pair
    ip, ip2p_images, seconds["ip2p"] = ip2p_subject(ip2p, judge, subject, s, seed, folder)
    measured["ip2p"] = {**ip, "seed": seed}
    return {"measured": measured, "seconds": seconds, "samples": samples, "ip2p_images": ip2p_images}


def run_claims(s: ClaimsSettings = ClaimsSettings(), out: str | Path = "outputs/world") -> Path:
    """Measure every claim, write outputs/world/claims.json, claims.md and its grids; return claims.md."""
    out, start = Path(out), time.perf_counter()
    if not (Path(s.data_root) / "subjects.csv").is_file():
        world.write_dataset(s.data_root)
    judge = load_judge()
    base_parts = components.load_components(fit_config(s.subjects[0], "class_images", 0, s).model.pretrained)
    scenes, reads = round_trip_reads(judge, base_parts.vae, s.judge_renders)
    accuracy = {"renders": judge_accuracy(judge, s.judge_renders), "vae_round_trips": read_rates(reads, scenes),
                "vae_markings": marking_cells(reads, scenes),
                "subject_photos": subject_photo_reads(judge, base_parts.vae, s.subjects, s.data_root)}
    base = base_follows_prompts(base_parts, judge, s)
    base["identifier_cosine"] = {sub: identifier_cosine(base_parts, world.ALL_SUBJECTS[sub]["shape"]) for sub in s.subjects}
    ip2p = load_ip2p(s.ip2p_model)
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    seconds: dict[str, list[float]] = {m: [] for m in METHODS if m not in ("base", "described")}
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
    bar.close()
    payload = {"settings": dataclasses.asdict(s), "fit": fit_config(s.subjects[0], "class_images", 0, s).as_dict(),
               "git_sha": git_sha(), "judge_accuracy": accuracy,
               "base": {k: v for k, v in base.items() if k not in ("examples", "example_prompts")},
               "summary": summarize(runs), "seconds": {m: mean_ci(v) for m, v in seconds.items() if v},
               "runs": runs, "wall_seconds": time.perf_counter() - start}
    write_json(out / "claims.json", payload)
    return write_text(out / "claims.md", claims_markdown(payload, grids, out))


# ------------------------------------------------------------------------------------------------ claims.md


def _ci(v: dict) -> str:
    """'0.72 ± 0.10 (pooled 0.71 [0.64, 0.77])' of an `over_subjects` summary."""
    if v["mean"] != v["mean"]:
        return "–"
    rate, lo, hi = v["pooled"]
    return f"{v['mean']:.2f} ± {v['ci']:.2f} ({rate:.2f} [{lo:.2f}, {hi:.2f}])"


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _claims_head(p: dict) -> list[str]:
    """The judge's and the base model's claims."""
    acc, base = p["judge_accuracy"], p["base"]
    lines = ["## 1. The judge reads held-out images right (target: >= 98% per attribute, on renders and on their VAE "
             "round trips, which is the most a generated image can be)\n\n| attribute | renders | VAE round trips |\n"
             "|---|---:|---:|\n"]
    lines += [f"| {a} | {v:.3f} | {acc['vae_round_trips'][a]:.3f} |\n" for a, v in acc["renders"].items()]
    ok = min(acc["renders"].values()) >= 0.98 and min(acc["vae_round_trips"].values()) >= 0.98
    lines.append(f"\n{_verdict(ok)}\n\n")
    cells = acc.get("vae_markings", {})
    if cells:
        sizes = list(world.VOCAB["sizes"])
        lines.append("VAE round trips, marking and its colour both read right, by marking and object size (where a "
                     "generated image loses the subject first):\n\n| marking | " + " | ".join(sizes) + " |\n|---|"
                     + "---:|" * len(sizes) + "\n")
        lines += [f"| {m} | " + " | ".join(f"{by[z]:.2f}" if z in by else "–" for z in sizes) + " |\n"
                  for m, by in cells.items()]
        lines.append("\n")
    photos = acc.get("subject_photos", {})
    if photos:
        lines.append("Each subject's photos judged the subject, as they are and after a VAE round trip (what a fine-tune "
                     "on them can draw at most): " + ", ".join(
                         f"{k} {v['photos'][0]}/{v['photos'][1]} → {v['round_trips'][0]}/{v['round_trips'][1]}"
                         for k, v in photos.items()) + ".\n\n")
    n_col = {k: len(v) for k, v in base["colours"].items()}
    rate, lo, hi = base["all_right_pooled"]
    lines.append(f"## 2. The base model follows prompts (targets: every attribute right in >= 80% of images of held-out full "
                 f"prompts; \"a <shape>\" over >= 6 colours)\n\nEvery attribute right: **{base['all_right']:.3f}** "
                 f"[{lo:.2f}, {hi:.2f}] ({_verdict(rate >= 0.8)}). Per attribute: "
                 + ", ".join(f"{a} {v:.2f}" for a, v in base["per_attribute"].items())
                 + ".\n\nBody colours of \"a <shape>\" images: " + ", ".join(f"{k} {v}" for k, v in n_col.items())
                 + f" ({_verdict(min(n_col.values()) >= 6)}).\n\n")
    if "marking_confusion" in base:
        lines.append("Marking asked → drawn (as the judge reads it): " + "; ".join(
            f"{asked}: " + ", ".join(f"{read} {n}" for read, n in row.items())
            for asked, row in base["marking_confusion"].items()) + ".\n\n")
    cos = base.get("identifier_cosine", {})
    if cos:
        lines.append("The identifier before fine-tuning: cosine of the text states of \"a sks <shape>\" and \"a <shape>\": "
                     + ", ".join(f"{k} {v:.3f}" for k, v in cos.items()) + " (its embedding was never trained: the "
                     "fine-tune must give it a meaning).\n\n")
    return lines


def _claims_dreambooth(p: dict) -> list[str]:
    """DreamBooth learns the subject (unseen contexts, and the photos' own for comparison); drift."""
    sm = p["summary"]
    lines = ["## 3. DreamBooth learns the subject (targets on unseen backgrounds: base <= 5% -> fine-tuned >= 70% judged "
             "to be the subject, the background right in >= 70% of those)\n\nEach cell: mean ± 95% CI over subjects "
             "(seeds averaged within a subject), then the rate pooled over all images [Wilson 95% interval]. The base model "
             "with the subject in words (\"a purple star with a yellow band at night\", no fine-tune) is the reference "
             "a fine-tune has to beat: the subjects are combinations its pretraining never showed.\n\n"]
    for c in ("recontextualization", "seen"):
        lines.append(f"**{CATEGORY_LABELS[c]}**\n\n| method | judged the subject | context right | context right, subject "
                     f"images |\n|---|---:|---:|---:|\n")
        lines += [f"| {VARIANT_LABELS[m]} | {_ci(sm[m]['subject'][c])} | {_ci(sm[m]['context'][c])} | "
                  f"{_ci(sm[m]['context_given_subject'][c])} |\n" for m in METHODS if m in sm]
        lines.append("\n")
    rc = "recontextualization"
    lines.append("**Which part of the subject is missing** (unseen backgrounds; each identity attribute read as the "
                 "subject's, pooled over all images)\n\n| method | " + " | ".join(a.replace("_", " ") for a in IDENTITY) +
                 " |\n|---|" + "---:|" * len(IDENTITY) + "\n")
    lines += [f"| {VARIANT_LABELS[m]} | " + " | ".join(f"{sm[m][part][rc]['pooled'][0]:.0%}" for part in PARTS) + " |\n"
              for m in METHODS if m in sm]
    lines.append("\n")
    ok = sm["base"]["subject"][rc]["mean"] <= 0.05 and sm["class_images"]["subject"][rc]["mean"] >= 0.7 and \
        sm["class_images"]["context_given_subject"][rc]["mean"] >= 0.7
    lines.append(f"{_verdict(ok)} (λ = 1, unseen backgrounds)\n\n")
    lines.append("## 4. Prior preservation prevents language drift (\"a <shape>\"; targets: judged the subject with λ = 1 at "
                 "most half of λ = 0; body colours with λ = 1 at least λ = 0)\n\n| method | \"a <shape>\" judged the subject "
                 "| distinct body colours (of 16) |\n|---|---:|---:|\n")
    lines += [f"| {VARIANT_LABELS[m]} | {_ci(sm[m]['class_is_subject'])} | "
              f"{sm[m]['class_colours']['mean']:.1f} ± {sm[m]['class_colours']['ci']:.1f} |\n"
              for m in METHODS if m in sm and "class_is_subject" in sm[m]]
    drift = sm["class_images"]["class_is_subject"]["mean"] <= 0.5 * sm["no_prior"]["class_is_subject"]["mean"] and \
        sm["class_images"]["class_colours"]["mean"] >= sm["no_prior"]["class_colours"]["mean"]
    no_drift = sm["no_prior"]["class_is_subject"]["mean"] == 0  # nothing for the prior to prevent: say so, not "met"
    lines.append(f"\n{'**not measurable**: without the prior (λ = 0) no class image is the subject' if no_drift else _verdict(drift)}"
                 f" (λ = 1 against λ = 0). The teacher prior needs no class images; it holds one frozen UNet copy "
                 f"(none with LoRA).\n\n")
    return lines


def _claims_compare(p: dict) -> list[str]:
    """InstructPix2Pix against DreamBooth per category, the no-op check, and wall times."""
    sm = p["summary"]
    lines = ["## 5. InstructPix2Pix against DreamBooth (per category: the asked change right, the subject kept, the photo's "
             "pose kept; target: InstructPix2Pix keeps the pose in >= 80% of background and colour edits)\n\n"
             "| category | method | change right | subject | pose of the photo kept |\n|---|---|---:|---:|---:|\n"]
    for c in CATEGORIES:
        for m in ("class_images", "ip2p"):
            pose = _ci(sm[m]["pose_kept"][c]) if m == "ip2p" else "–"
            lines.append(f"| {CATEGORY_LABELS[c]} | {VARIANT_LABELS[m]} | {_ci(sm[m]['context'][c])} | "
                         f"{_ci(sm[m]['subject'][c])} | {pose} |\n")
    kept = [sm["ip2p"]["pose_kept"][c]["mean"] for c in ("recontextualization", "seen", "property")]
    lines.append(f"\n{_verdict(min(kept) >= 0.8)} (pose kept on background and colour edits)\n\n")
    lines.append(f"The no-op instruction (\"{world.NO_OP}\") gives the photo back, every attribute as the judge reads the "
                 f"photo: {_ci(sm['ip2p']['no_op'])}.\n\n")
    lines.append("| method | seconds per subject (fine-tune + sampling, or the edits) |\n|---|---:|\n")
    lines += [f"| {VARIANT_LABELS[m]} | " + ("reused from an earlier run, not timed" if math.isnan(v[0]) else
              f"{v[0]:.1f} ± {v[1]:.1f}") + " |\n" for m, v in p["seconds"].items()]
    return lines


def claims_markdown(p: dict, grids: list[Path], out: Path) -> str:
    """claims.md: a table and a verdict per claim, the grids, the command."""
    s, fit = p["settings"], p["fit"]
    lines = ["# The toy world: DreamBooth's claims against ground truth\n\n",
             f"Subjects {', '.join(s['subjects'])}; seeds {s['seeds']}; DreamBooth as `make experiment MODEL=world` "
             f"(world.yaml{': ' + ' '.join(s['fit_args']) if s['fit_args'] else ''}): {fit['trainer']['max_steps']} steps at "
             f"lr {fit['model']['optim']['learning_rate']}, text encoder trained: {fit['model']['train_text_encoder']}, "
             f"{fit['data']['num_class_images']} class images; {s['images_per_prompt']} images per template. "
             f"Reproduce: `make world-claims` (git {p['git_sha']}, {p['wall_seconds'] / 60:.1f} min).\n\n"]
    lines += _claims_head(p) + _claims_dreambooth(p) + _claims_compare(p)
    lines.append("\n## Grids (first seed; rows: photos, each method on the first template, then \"a <shape>\")\n\n")
    lines += [f"![{g.stem}]({g.relative_to(out)})\n\n" for g in grids]
    return "".join(lines)
