"""The paper's ablations as curves, in the toy world (`make world-ablations`): how the subject share, the language drift,
the diversity of the class and the context follow the fine-tuning steps, λ, the learning rate, the number of class
images, the kind of prior, the text encoder's training and the photos' captions (against the paper's one prompt); and
the change-right / subject-kept trade-off of InstructPix2Pix over its two guidance scales against DreamBooth over its
guidance. Run on the validation subjects (what world.yaml's defaults were chosen on), with paired seeds: every point
of a curve shares the subjects, seeds, photos and sampling noise.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pytorch_lightning as pl
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from . import world
from .files import write_json, write_text
from .instructpix2pix import load as load_ip2p
from .judge import load_judge
from .loggers import git_sha
from .report import mean_ci
from .world_claims import (
    CATEGORIES,
    ClaimsSettings,
    counts,
    finetune,
    fit_config,
    ip2p_subject,
    measure_samples,
    protocol,
    sample_subject,
)

UNSEEN = "recontextualization"


@dataclass(frozen=True)
class AblationSettings:
    """What `world-ablations` varies, around world.yaml's DreamBooth (each axis alone, the others at their default).

    Args:
        subjects: world subjects (default: the validation ones)
        seeds: seeds per subject (paired across every point)
        steps: fine-tuning steps at which one fit is sampled (must include world.yaml's max_steps, where the other
            axes' fits end and the guidance trade-off is sampled; steps past it look for the overfitting point)
        prior_weights: λ values (0 = no prior)
        lr_factors: learning rates as multiples of world.yaml's
        text_encoder_lr_factors: the text encoder's learning rates as multiples of world.yaml's (0 = frozen)
        class_images: numbers of class images
        captions: also fit without the photos' captions (every photo "a sks <shape>", as in the paper)
        guidance: DreamBooth's sampling guidance scales (for the trade-off)
        ip2p_guidance: InstructPix2Pix text guidance scales
        ip2p_image_guidance: InstructPix2Pix image guidance scales
        images_per_prompt: images per template and point
        class_prompt_images: images of "a <shape>" per point
        data_root: the world subjects
    """

    subjects: tuple[str, ...] = tuple(world.VALIDATION_SUBJECTS)
    seeds: tuple[int, ...] = (0,)
    # 1,600 already shows the overfitting past world.yaml's 800 (3,200 went further down; README): the 60 min budget
    steps: tuple[int, ...] = (100, 200, 400, 800, 1600)
    prior_weights: tuple[float, ...] = (0.0, 0.3, 1.0, 3.0)
    lr_factors: tuple[float, ...] = (0.3, 1.0, 3.0)
    text_encoder_lr_factors: tuple[float, ...] = (0.0,)  # world.yaml trains it at 1.0 (the default point): 2 points
    # world.yaml's 48 joins it as the default point. 24 / 96 / 192 showed no trend in three runs (README); one fit per
    # point and subject is ~72 s; this grid took 56.8 min on four subjects (2026-12-07, README).
    class_images: tuple[int, ...] = (96,)
    captions: bool = True
    guidance: tuple[float, ...] = (1.5, 3.0, 5.0, 7.5)
    ip2p_guidance: tuple[float, ...] = (2.0, 5.0, 7.5)
    ip2p_image_guidance: tuple[float, ...] = (1.0, 2.5, 5.0)
    images_per_prompt: int = 2
    class_prompt_images: int = 8
    data_root: str = "data/world"


def point(measured: dict) -> dict[str, float]:
    """One model's numbers: subject share and context right on unseen backgrounds, "a <shape>" judged the subject
    (drift), distinct body colours of "a <shape>" (diversity)."""
    k, n = counts(measured, "subject", UNSEEN)
    kc, nc = counts(measured, "context", UNSEEN)
    cls = measured["class"]
    return {"subject": k / n, "context": kc / nc, "drift": float(np.mean(cls["is_subject"])),
            "diversity": float(len(set(cls["colours"])))}


class Snapshots(pl.Callback):
    """Calls `measure(module, step)` after the given optimizer steps of a fit (in eval mode with the EMA weights when
    model.optim.ema_decay is set, then back)."""

    def __init__(self, steps: tuple[int, ...], measure: Callable) -> None:
        self.steps, self.measure, self.done = set(steps), measure, set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step in self.steps and step not in self.done:
            self.done.add(step)
            pl_module.eval()
            with pl_module.averaged():
                self.measure(pl_module, step)
            pl_module.train()


def run_ablations(a: AblationSettings = AblationSettings(), out: str | Path = "outputs/world") -> Path:
    """Every axis on every (subject, seed): ablations.json, ablations.md with the curves and the trade-off, a W&B run."""
    out, start = Path(out), time.perf_counter()
    if not (Path(a.data_root) / "subjects.csv").is_file():
        world.write_dataset(a.data_root)
    s = ClaimsSettings(subjects=a.subjects, images_per_prompt=a.images_per_prompt,
                       class_prompt_images=a.class_prompt_images, data_root=a.data_root)
    default = fit_config(a.subjects[0], "class_images", 0, s)
    lr, n_class, steps = default.model.optim.learning_rate, default.data.num_class_images, default.trainer.max_steps
    if steps not in a.steps:
        raise ValueError(f"AblationSettings.steps {a.steps} must include world.yaml's max_steps ({steps}): the other "
                         "axes' default point is the steps curve's point there")
    te = (default.model.optim.text_encoder_learning_rate or lr) / lr if default.model.train_text_encoder else 0.0
    judge, ip2p = load_judge(), load_ip2p(s.ip2p_model)
    proto = protocol(s)
    fits = [("lambda", w) for w in a.prior_weights if w != 1.0] + [("lr", f) for f in a.lr_factors if f != 1.0] + \
        [("class_images", c) for c in a.class_images if c != n_class] + [("prior", "teacher")] + \
        [("text_encoder", f) for f in a.text_encoder_lr_factors if f != te] + [("captions", "off")] * a.captions
    results: dict[str, dict] = {"steps": {}, "lambda": {}, "lr": {}, "class_images": {}, "prior": {},
                                "text_encoder": {}, "captions": {}, "guidance": {}, "ip2p": {}}
    bar = tqdm(total=len(a.subjects) * len(a.seeds) * (len(fits) + 2), desc="ablations (fits)", unit="fit")

    def add(axis: str, value, subject: str, numbers: dict) -> None:
        results[axis].setdefault(str(value), {}).setdefault(subject, []).append(numbers)

    for subject in a.subjects:
        for seed in a.seeds:
            bar.set_postfix(subject=subject, seed=seed)

            def snap(module, step, subject=subject, seed=seed):
                add("steps", step, subject, point(measure_samples(judge, subject, sample_subject(
                    module.parts(), subject, s, seed, proto))))
                if step == steps:  # world.yaml's fit: DreamBooth's side of the trade-off, at other guidance scales
                    for g in a.guidance:
                        m = measure_samples(judge, subject, sample_subject(
                            module.parts(), subject, s, seed, dataclasses.replace(proto, guidance_scale=g)))
                        add("guidance", g, subject, {**point(m), **_change_and_subject(m)})

            main = dataclasses.replace(s, fit_args=("--trainer.max_steps", str(steps)))
            # One fit runs on past world.yaml's steps, sampled at each of `a.steps` (a constant learning rate after
            # the warm-up, so a snapshot is the fit of that length); the other axes' fits stop at world.yaml's.
            finetune(subject, "class_images", seed, dataclasses.replace(s, fit_args=("--trainer.max_steps",
                     str(max(a.steps)))), callbacks=[Snapshots(a.steps, snap)])
            bar.update()
            at_default = results["steps"][str(steps)][subject][-1]
            for axis, value in (("lambda", 1.0), ("lr", 1.0), ("class_images", n_class), ("prior", "class_images"),
                                ("text_encoder", te), ("captions", "on")):
                add(axis, value, subject, at_default)
            for tg in a.ip2p_guidance:
                for ig in a.ip2p_image_guidance:
                    m, _, _ = ip2p_subject(ip2p, judge, subject, s, seed, out / "ablations" / "ip2p" /
                                           f"{subject}_{seed}_{tg}_{ig}", guidance=tg, image_guidance=ig)
                    add("ip2p", f"{tg}/{ig}", subject, {**_change_and_subject(m), **_photo_kept(m)})
            bar.update()
            for axis, value in fits:
                args = fit_args(axis, value, lr)
                variant = "teacher" if axis == "prior" else "class_images"
                module, _ = finetune(subject, variant, seed, dataclasses.replace(main, fit_args=(*main.fit_args, *args)))
                add(axis, value, subject, point(measure_samples(judge, subject, sample_subject(
                    module.parts(), subject, s, seed, proto))))
                bar.update()
    bar.close()
    summary = {axis: {v: _summarize(by_subject) for v, by_subject in vals.items()} for axis, vals in results.items()}
    payload = {"settings": dataclasses.asdict(a), "default": {"learning_rate": lr, "class_images": n_class,
               "steps": default.trainer.max_steps, "guidance": proto.guidance_scale}, "summary": summary,
               "git_sha": git_sha(), "wall_seconds": time.perf_counter() - start}
    write_json(out / "ablations.json", payload)
    figures = plot_ablations(summary, payload["default"], out / "figures")
    log_wandb(payload, figures, out)
    return write_text(out / "ablations.md", ablations_markdown(payload, figures, out))


def fit_args(axis: str, value, lr: float) -> tuple[str, ...]:
    """The fit arguments of one ablation point over world.yaml's (`lr`: its learning rate)."""
    if axis == "lambda":
        return ("--model.prior_loss_weight", str(value), *(("--data.with_prior_preservation", "false") if value == 0 else ()))
    if axis == "lr":
        return ("--model.optim.learning_rate", str(lr * value))
    if axis == "class_images":
        return ("--data.num_class_images", str(value))
    if axis == "text_encoder":  # 0: frozen
        return ("--model.train_text_encoder", "true", "--model.optim.text_encoder_learning_rate", str(lr * value)) \
            if value else ("--model.train_text_encoder", "false")
    if axis == "captions":  # off: the paper's one instance prompt for every photo
        return ("--data.captions", "false")
    return ()  # prior: the teacher variant, no extra argument


def _pooled(m: dict, metric: str, categories: tuple[str, ...]) -> float:
    """The share of images with `metric` true over every template of `categories`."""
    k, n = np.sum([counts(m, metric, c) for c in categories], axis=0)
    return float(k / n)


def _change_and_subject(m: dict) -> dict[str, float]:
    """Over every edit-like template (backgrounds, colours, poses): the asked change right, the subject kept."""
    return {"change_right": _pooled(m, "context", CATEGORIES), "subject_kept": _pooled(m, "subject", CATEGORIES)}


def _photo_kept(m: dict) -> dict[str, float]:
    """InstructPix2Pix: the photo's pose (size and position) kept on background and colour edits, and the no-op
    instruction giving the photo back (the claims' two targets for it)."""
    kept_pose = tuple(c for c in CATEGORIES if c != "pose")
    return {"pose_kept": _pooled(m, "pose_kept", kept_pose), "no_op": float(np.mean(m["no_op"]))}


def _summarize(by_subject: dict[str, list[dict]]) -> dict[str, tuple[float, float]]:
    """Each number: seeds averaged within a subject, mean ± 95% CI over subjects."""
    keys = next(iter(by_subject.values()))[0].keys()
    return {k: mean_ci([float(np.mean([r[k] for r in rs])) for rs in by_subject.values()]) for k in keys}


AXES = {"steps": "fine-tuning steps", "lambda": "prior weight λ", "lr": "learning rate (× world.yaml's)",
        "class_images": "class images", "prior": "prior",
        "text_encoder": "text-encoder learning rate (× world.yaml's; 0 = frozen)",
        "captions": "captions (off: one prompt)"}  # short: it labels each of the figure's four x axes
CATEGORICAL = ("prior", "captions")  # axes whose values are names, not numbers
CURVES = {"subject": "subject share (unseen backgrounds)", "context": "background right (unseen)",
          "drift": "\"a <shape>\" judged the subject (drift)", "diversity": "body colours of \"a <shape>\""}


BOUNDS = {"subject": (0.0, 1.0), "context": (0.0, 1.0), "drift": (0.0, 1.0), "diversity": (0.0, float("inf")),
          "subject_kept": (0.0, 1.0), "change_right": (0.0, 1.0)}


def error_bars(points: list[tuple[float, float]], low: float, high: float) -> list[list[float]]:
    """Matplotlib's (2, N) error bars of (mean, half-width) points, cut to [low, high]: a rate's t interval over four
    subjects can reach below 0 or above 1, which no rate can."""
    return [[m - max(low, m - h) for m, h in points], [min(high, m + h) - m for m, h in points]]


def plot_ablations(summary: dict, default: dict, folder: Path) -> dict[str, Path]:
    """One figure per axis (the four numbers with their CIs) and the trade-off plot."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for axis, label in AXES.items():
        values = summary.get(axis, {})
        if not values:
            continue
        keys = list(values)
        xs = list(range(len(keys))) if axis in CATEGORICAL else [float(k) for k in keys]
        order = sorted(range(len(keys)), key=lambda i: xs[i])
        fig = Figure(figsize=(10, 2.8), dpi=100)
        for j, (curve, title) in enumerate(CURVES.items()):
            ax = fig.add_subplot(1, 4, j + 1)
            ys = [values[keys[i]][curve] for i in order]
            ax.errorbar([xs[i] for i in order], [y[0] for y in ys], yerr=error_bars(ys, *BOUNDS[curve]), marker="o",
                        capsize=3)
            if axis in CATEGORICAL:
                ax.set_xticks(xs, keys)
            elif axis in ("steps", "class_images", "lr"):
                ax.set_xscale("log")
                ax.minorticks_off()  # log minor labels (2×10², 3×10², ...) overlap: label the measured points only
                ax.set_xticks(xs, [f"{x:g}" for x in xs], rotation=45, fontsize=7)  # 800 and 1600 crowd
            ax.set_title(title, fontsize=8)
            ax.set_xlabel(label, fontsize=8)
        fig.tight_layout()
        paths[axis] = folder / f"ablation_{axis}.png"
        fig.savefig(paths[axis])
    paths["tradeoff"] = folder / "ablation_tradeoff.png"
    tradeoff_figure(summary).savefig(paths["tradeoff"])
    return paths


def tradeoff_figure(summary: dict) -> Figure:
    """Change right against subject kept: InstructPix2Pix at each guidance pair, DreamBooth at each guidance."""
    fig = Figure(figsize=(8.5, 4.5), dpi=100)
    ax = fig.subplots()
    # InstructPix2Pix's points crowd one corner (it changes everything and keeps no subject), so each guidance pair
    # gets its own colour and a legend entry instead of a label beside it; DreamBooth's points are labelled in place.
    ip2p = summary.get("ip2p", {})
    colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, max(len(ip2p), 1)))
    for (lab, v), colour in zip(ip2p.items(), colours, strict=False):
        ax.errorbar([v["subject_kept"][0]], [v["change_right"][0]],
                    xerr=error_bars([v["subject_kept"]], *BOUNDS["subject_kept"]),
                    yerr=error_bars([v["change_right"]], *BOUNDS["change_right"]),
                    fmt="^", color=colour, capsize=2, label=f"InstructPix2Pix {lab} (text / image guidance)")
    pts = summary.get("guidance", {})
    ax.errorbar([v["subject_kept"][0] for v in pts.values()], [v["change_right"][0] for v in pts.values()],
                xerr=error_bars([v["subject_kept"] for v in pts.values()], *BOUNDS["subject_kept"]),
                yerr=error_bars([v["change_right"] for v in pts.values()], *BOUNDS["change_right"]),
                fmt="o", color="tab:red", capsize=2, label="DreamBooth (guidance beside each point)")
    for lab, v in pts.items():
        ax.annotate(lab, (v["subject_kept"][0], v["change_right"][0]), xytext=(4, 2), textcoords="offset points",
                    fontsize=7)
    ax.set_xlabel("subject kept")
    ax.set_ylabel("change right")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the axes: inside, it hides error bars
    ax.set_title("change right against subject kept (mean ± 95% CI over subjects)", fontsize=8)
    fig.tight_layout()
    return fig


def log_wandb(payload: dict, figures: dict[str, Path], out: Path) -> None:
    """The curves as a W&B run (offline unless wandb has credentials): one table per axis and the figures."""
    import wandb  # noqa: PLC0415 - only this report logs to W&B itself

    from .loggers import finish_wandb, wandb_online  # noqa: PLC0415

    run = wandb.init(project="dreambooth_pl", group="world-ablations", name="world-ablations", dir=str(out),
                     mode="online" if wandb_online() else "offline", config=payload["settings"])
    try:
        for axis, values in payload["summary"].items():
            if not values:
                continue
            cols = next(iter(values.values())).keys()
            rows = [[v, *(values[v][c][0] for c in cols), *(values[v][c][1] for c in cols)] for v in values]
            run.log({f"ablations/{axis}": wandb.Table(columns=[axis, *cols, *(f"{c}_ci" for c in cols)], data=rows)})
        run.log({f"figures/{k}": wandb.Image(str(p)) for k, p in figures.items()})
    finally:
        finish_wandb()


def _axis_order(value: str) -> tuple:
    """Rows of an axis in numeric order (the default is measured first), names after numbers."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def ablations_markdown(p: dict, figures: dict[str, Path], out: Path) -> str:
    """ablations.md: the settings, a table and a figure per axis, the trade-off."""
    a, d = p["settings"], p["default"]
    lines = ["# The toy world: DreamBooth's ablations\n\n",
             f"Around world.yaml's DreamBooth ({d['steps']} steps, lr {d['learning_rate']}, {d['class_images']} class "
             f"images, guidance {d['guidance']}), one axis at a time, on the validation subjects {', '.join(a['subjects'])} "
             f"× seeds {a['seeds']} (paired: the same photos and sampling noise at every point); {a['images_per_prompt']} "
             f"images per template. Mean ± 95% CI over subjects (seeds averaged within a subject). Reproduce: "
             f"`make world-ablations` (git {p['git_sha']}, {p['wall_seconds'] / 60:.1f} min).\n\n"]
    for axis, label in AXES.items():
        values = p["summary"].get(axis)
        if not values:
            continue
        lines.append(f"## {label}\n\n| {label} | " + " | ".join(CURVES.values()) + " |\n|---|" + "---:|" * len(CURVES) + "\n")
        lines += [f"| {v} | " + " | ".join(f"{values[v][c][0]:.2f} ± {values[v][c][1]:.2f}" for c in CURVES) + " |\n"
                  for v in sorted(values, key=_axis_order)]
        lines.append(f"\n![{axis}]({figures[axis].relative_to(out)})\n\n")
    lines.append("## InstructPix2Pix against DreamBooth: change right and subject kept\n\n| method | setting | change right | "
                 "subject kept |\n|---|---|---:|---:|\n")
    for name, key in (("InstructPix2Pix", "ip2p"), ("DreamBooth", "guidance")):
        lines += [f"| {name} | {v} | {r['change_right'][0]:.2f} ± {r['change_right'][1]:.2f} | "
                  f"{r['subject_kept'][0]:.2f} ± {r['subject_kept'][1]:.2f} |\n" for v, r in p["summary"][key].items()]
    ip2p = p["summary"]["ip2p"]
    if ip2p and "pose_kept" in next(iter(ip2p.values())):
        lines.append("\nInstructPix2Pix's own targets at each guidance pair: the photo's pose (size and position) kept on "
                     "background and colour edits (≥ 0.80), the no-op instruction giving the photo back.\n\n"
                     "| text / image guidance | pose kept | no-op gives the photo |\n|---|---:|---:|\n")
        lines += [f"| {v} | {r['pose_kept'][0]:.2f} ± {r['pose_kept'][1]:.2f} | {r['no_op'][0]:.2f} ± "
                  f"{r['no_op'][1]:.2f} |\n" for v, r in ip2p.items()]
    lines.append(f"\n![trade-off]({figures['tradeoff'].relative_to(out)})\n")
    return "".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(run_ablations())
