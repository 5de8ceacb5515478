"""Local report of a run: metrics.json + samples + metrics.csv -> report.md and figures/*.png."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from matplotlib.figure import Figure
from PIL import Image

from .data import load_image
from .evaluation import FILE_RE, METRIC_KEYS, OPTIONAL_KEYS
from .files import labelled_grid, square, write_image, write_text

LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "clip_t_no_token": "CLIP-T (no token)",
          "pres": "PRES ↓", "div": "DIV", "dino_identity": "DINO (identity)", "clip_i_identity": "CLIP-I (identity)"}
# Two-sided 95% Student-t quantiles for n-1 degrees of freedom (n = number of subjects).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 29: 2.045, 30: 2.042}


def t975(df: int) -> float:
    """Student-t 97.5% quantile (the nearest tabulated df at or below; 1.96 for large df)."""
    if df > 30:
        return 1.96
    return T975[max(k for k in T975 if k <= df)]


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% confidence interval); half-width 0 for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t975(n - 1) * sd / math.sqrt(n)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """A pooled rate k / n with its Wilson score interval: (rate, low, high); (nan, nan, nan) for n = 0."""
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, max(0.0, centre - half), min(1.0, centre + half)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "–"


def metric_table(rows: dict[str, dict], keys=METRIC_KEYS) -> str:
    """Markdown table: one row per label, one column per metric."""
    head = "| | " + " | ".join(LABELS[k] for k in keys) + " |\n|---|" + "---:|" * len(keys) + "\n"
    return head + "".join(f"| {label} | " + " | ".join(_fmt(r.get(k)) for k in keys) + " |\n" for label, r in rows.items())


def read_csv_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Series per key from Lightning's CSVLogger file(s) under the run folder."""
    series: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(run_dir.glob("csv/**/metrics.csv")) + sorted(run_dir.glob("csv/metrics.csv")):
        with f.open() as fh:
            for row in csv.DictReader(fh):
                step = int(float(row.get("step") or 0))
                for k, v in row.items():
                    if k != "step" and v not in (None, ""):
                        series.setdefault(k, []).append((step, float(v)))
    return series


def _save_figure(fig, ax, title: str, path: Path) -> Path:
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)  # a plain Figure (no pyplot): files only, no display, nothing global to close
    return path


def plot_series(series: dict[str, list[tuple[int, float]]], keys: list[str], path: Path, title: str) -> Path | None:
    present = [k for k in keys if series.get(k)]
    if not present:
        return None
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    for k in present:
        xs, ys = zip(*sorted(set(series[k])), strict=True)
        ax.plot(xs, ys, label=k, marker="o" if len(xs) < 30 else None)
    ax.set_xlabel("step")
    return _save_figure(fig, ax, title, path)


def prompt_grid(run_dir: Path, index: int, prompt: str, stages: list[str], path: Path, size: int = 128) -> Path | None:
    """One row per stage (base, final) of the prompt's images, labelled."""
    rows = []
    for stage in stages:
        files = sorted((p for p in (run_dir / "samples" / stage).glob(f"{index:02d}_*.png") if FILE_RE.match(p.name)),
                       key=lambda p: int(FILE_RE.match(p.name).group(2)))
        if files:
            rows.append((stage, [Image.open(f) for f in files]))
    return labelled_grid(rows, prompt, path, size, label_w=70) if rows else None


def learned_grid(run_dir: Path, photos: list[Path], per_prompt: list[dict], path: Path, prompts: int = 3,
                 size: int = 128) -> Path | None:
    """The run at a glance: the photos, then for the first `prompts` prompts the base model's images and the
    fine-tuned model's (the first image of each), so a person sees whether the subject was learnt."""
    shown = per_prompt[:prompts]
    rows = [("photos", [load_image(p) for p in photos[:4]])]
    for stage, label in (("base", "base model"), ("final", "DreamBooth")):
        images = []
        for p in shown:
            files = sorted((f for f in (run_dir / "samples" / stage).glob(f"{p['index']:02d}_*.png") if FILE_RE.match(f.name)),
                           key=lambda f: int(FILE_RE.match(f.name).group(2)))[:2]
            images += [Image.open(f) for f in files]
        if images:
            rows.append((label, images))
    if len(rows) < 3:
        return None
    title = " | ".join(p["prompt"] for p in shown) + " (2 images each)"
    return labelled_grid(rows, title, path, size, label_w=100)


def photo_strip(paths: list[Path], path: Path, size: int = 128) -> Path | None:
    """The subject's real photos side by side."""
    if not paths:
        return None
    strip = Image.new("RGB", (len(paths) * size, size), "white")
    for k, p in enumerate(paths):
        strip.paste(square(load_image(p), size), (k * size, 0))
    return write_image(strip, path)


def exported_line(run_dir: Path) -> str:
    """Which weights the run exported (exported.json, written by ExportModel): the best step or the last."""
    f = run_dir / "exported.json"
    if not f.is_file():
        return ""
    e = json.loads(f.read_text())
    if e.get("weights") == "best":
        return (f"Exported model (`model/`): the **best checkpoint, step {e['step']}** ({e['monitor']} = "
                f"{e['score']:.4f}), not the last step.\n\n")
    return f"Exported model (`model/`): the last step, {e.get('step')}.\n\n"


def write_report(run_dir: str | Path) -> Path:
    """Write run_dir/report.md and run_dir/figures/ from the run's metrics.json, samples and CSV log."""
    run_dir = Path(run_dir)
    mfile = run_dir / "metrics.json"
    if not mfile.is_file():
        raise FileNotFoundError(f"{mfile} not found: the run has no evaluation (is SampleAndScore in trainer.callbacks?)")
    m = json.loads(mfile.read_text())
    stages = m.get("stages", {})
    fig = run_dir / "figures"
    fig.mkdir(exist_ok=True)
    calibrated = m.get("calibrated", False)
    real = photo_strip([Path(p) for p in m.get("real_photos", [])], fig / "real.png")
    final_prompts = stages.get("final", {}).get("per_prompt", [])
    learned = learned_grid(run_dir, [Path(p) for p in m.get("real_photos", [])], final_prompts, fig / "learned.png")
    warn = "" if calibrated else (
        "> **Uncalibrated smoke numbers.** These scores come from random-initialised tiny encoders and/or a "
        "random tiny diffusion model: they show the pipeline runs, not image quality.\n\n")
    rows = {}
    if "base" in stages:
        rows["Base model (before)"] = stages["base"]["metrics"]
    if "final" in stages:
        rows[f"DreamBooth (after, step {stages['final'].get('step')})"] = stages["final"]["metrics"]
    rows.update(m.get("reference", {}))  # the paper's rows on the real encoders' scale; none beside the world judge
    keys = (*METRIC_KEYS, *(k for k in OPTIONAL_KEYS if any(k in r for r in rows.values())))
    lines = [f"# DreamBooth report: {m.get('subject')} ({m.get('class_noun')})\n\n", warn,
             f"Identifier `{m.get('identifier')}`; encoders: {', '.join(f'{k}={v}' for k, v in m.get('encoders', {}).items())}; "
             f"protocol: {json.dumps(m.get('protocol'))}.\n\n",
             *([f"![real photos](figures/{real.name})\n\n"] if real else []),
             *([f"## What was learnt\n\n![photos, base model, DreamBooth](figures/{learned.name})\n\n"] if learned else []),
             exported_line(run_dir),
             "## Scores\n\n", metric_table(rows, keys),
             "\nDINO, CLIP-I: subject fidelity (mean cosine over real×generated pairs). CLIP-T: prompt fidelity "
             "(raw cosine). PRES: similarity of plain class-prompt images to the subject (lower = less drift). "
             "DIV: mean LPIPS within a prompt (higher = more diverse)."
             + (" Paper rows: DreamBooth Table 1, for reference." if m.get("reference") else "") + "\n\n"]
    series = read_csv_metrics(run_dir)
    loss = plot_series(series, ["train/loss", "train/loss_instance", "train/loss_prior"], fig / "loss.png", "training loss")
    val_loss = plot_series(series, ["val/loss_instance", "val/loss_prior"], fig / "val_loss.png",
                           "validation loss (fixed noise; prior: held-out class images)")
    val = plot_series(series, [f"val/{k}" for k in METRIC_KEYS], fig / "metrics.png", "scores during training")
    if loss or val_loss or val:
        lines.append("## Curves\n\n")
        lines += [f"![{p.stem}](figures/{p.name})\n\n" for p in (loss, val_loss, val) if p]
    per_prompt = {p["index"]: p for p in stages.get("final", stages.get("base", {})).get("per_prompt", [])}
    if per_prompt:
        lines.append("## Per prompt\n\n")
        show = [s for s in ("base", "final") if s in stages]
        for idx, p in sorted(per_prompt.items()):
            g = prompt_grid(run_dir, idx, p["prompt"], show, fig / f"prompt_{idx:02d}.png")
            scores = ", ".join(f"{LABELS[k]} {_fmt(p.get(k))}" for k in ("dino", "clip_i", "clip_t") if k in p)
            lines.append(f"**{idx:02d}. {p['prompt']}** — {scores}\n\n")
            if g:
                lines.append(f"![prompt {idx}](figures/{g.name})\n\n")
    out = run_dir / "report.md"
    return write_text(out, "".join(lines))


def report_run(run_dir: str | Path) -> list[Path]:
    """The reports of one run folder: report.md, or for a run of several subjects one per subject and a table over
    them (<run>/report.md)."""
    run_dir = Path(run_dir)
    subjects = sorted(run_dir.glob("subjects/*/metrics.json"))
    if subjects and not (run_dir / "metrics.json").is_file():
        return [*(write_report(f.parent) for f in subjects), aggregate(subjects, run_dir / "report.md")]
    return [write_report(run_dir)]


def aggregate(metric_files: list[str | Path], out: str | Path, stage: str = "final") -> Path:
    """One table over subjects: mean ± 95% CI per metric (DreamBench Table 1 style), base and fine-tuned."""
    per_stage: dict[str, dict[str, list[float]]] = {"base": {}, stage: {}}
    subjects, calibrated, reference = [], True, {}
    for f in metric_files:
        m = json.loads(Path(f).read_text())
        subjects.append(m.get("subject", Path(f).parent.name))
        calibrated &= bool(m.get("calibrated"))
        reference = m.get("reference", {})
        for s in per_stage:
            for k, v in m.get("stages", {}).get(s, {}).get("metrics", {}).items():
                per_stage[s].setdefault(k, []).append(v)
    rows = {"Base model": per_stage["base"], "DreamBooth (ours)": per_stage[stage]}
    keys = (*METRIC_KEYS, *(k for k in OPTIONAL_KEYS if k in per_stage[stage]))
    return _ci_table(out, f"DreamBench: {len(subjects)} subjects", subjects, calibrated, rows, keys, LABELS, reference)


def _ci_table(out: str | Path, title: str, subjects: list[str], calibrated: bool, rows: dict[str, dict[str, list[float]]],
              keys, labels: dict[str, str], fixed_rows: dict[str, dict] | None = None) -> Path:
    """A markdown table over subjects: mean ± 95% CI per row and metric, then fixed reference rows."""
    head = "| | " + " | ".join(labels[k] for k in keys) + " |\n|---|" + "---:|" * len(keys) + "\n"
    body = "".join(f"| {label} | " + " | ".join("{:.3f} ± {:.3f}".format(*mean_ci(vals[k])) if vals.get(k) else "–"
                                                for k in keys) + " |\n" for label, vals in rows.items())
    body += "".join(f"| {label} | " + " | ".join(_fmt(r.get(k)) for k in keys) + " |\n"
                    for label, r in (fixed_rows or {}).items())
    text = (f"# {title}\n\n"
            + ("" if calibrated else "> **Uncalibrated smoke numbers** (random tiny encoders/models).\n\n")
            + f"Subjects: {', '.join(subjects)}. Mean ± 95% CI (Student t over subjects).\n\n" + head + body)
    return write_text(out, text)


COMPARE_KEYS = ("dino", "clip_i", "clip_t", "div", "clip_dir", "clip_img_input")
COMPARE_LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T (class prompt)", "div": "DIV",
                  "clip_dir": "CLIP direction", "clip_img_input": "CLIP-I to input photo"}


def tradeoff_plot(methods: dict, path: Path) -> Path:
    """CLIP-T against DINO per prompt for each method: the fidelity/editability trade-off."""
    fig = Figure(figsize=(6, 5), dpi=100)
    ax = fig.subplots()
    for (name, m), marker in zip(methods.items(), "o^sD", strict=False):
        pp = m["per_prompt"]
        pts = ax.scatter([p["dino"] for p in pp], [p["clip_t"] for p in pp], label=name, marker=marker, alpha=0.75)
        mm = m["metrics"]
        ax.scatter([mm["dino"]], [mm["clip_t"]], marker="*", s=250, color=pts.get_facecolor()[0][:3],
                   edgecolor="black", zorder=3)
    ax.set_xlabel("DINO (subject fidelity)")
    ax.set_ylabel("CLIP-T (prompt fidelity)")
    return _save_figure(fig, ax, "per prompt; stars: means", path)


def write_compare_report(run_dir: Path, payload: dict, prompts, photos: list[Image.Image]) -> Path:
    """compare/report.md: every metric for base, DreamBooth and InstructPix2Pix, grids, trade-off plot, cost."""
    out = Path(run_dir) / "compare"
    fig = out / "figures"
    fig.mkdir(parents=True, exist_ok=True)
    methods = payload["methods"]
    s = payload["settings"]
    lines = [f"# DreamBooth vs InstructPix2Pix: {payload['subject']} ({payload['class_noun']})\n\n"]
    if not payload["calibrated"]:
        lines.append("> **Uncalibrated smoke numbers.** Random tiny encoders and/or random tiny models: "
                     "the comparison shows the pipeline runs, not which method is better.\n\n")
    lines += [f"InstructPix2Pix `{payload['model']}`: text guidance {s['guidance_scale']}, image guidance "
              f"{s['image_guidance_scale']}, {s['steps']} steps, {s['images_per_prompt']} images per prompt "
              f"(image k edits photo k mod #photos, seed {s['seed']} + k).\n\n", "## Scores\n\n"]
    head = "| | " + " | ".join(COMPARE_LABELS[k] for k in COMPARE_KEYS) + " |\n|---|" + "---:|" * len(COMPARE_KEYS) + "\n"
    lines.append(head + "".join(f"| {name} | " + " | ".join(_fmt(m["metrics"].get(k)) for k in COMPARE_KEYS) + " |\n"
                                for name, m in methods.items()))
    lines.append("".join(f"| {label} | " + " | ".join(_fmt(r.get(k)) for k in COMPARE_KEYS) + " |\n"
                         for label, r in payload.get("reference", {}).items()))
    lines.append(
        "\nCLIP-T here uses the benchmark prompt with the class noun for every method (InstructPix2Pix knows no "
        "identifier). DINO / CLIP-I favour keeping the subject (an unedited photo scores high); CLIP-T and "
        "CLIP direction favour following the prompt; CLIP-I to the input photo favours changing little. "
        "DreamBooth re-renders the subject, InstructPix2Pix edits a given photo.\n\n")
    lines.append("## Cost\n\n| | wall time (s) | peak GPU memory (GB) | what |\n|---|---:|---:|---|\n")
    for name, c in payload["cost"].items():
        lines.append(f"| {name} | {_fmt(c.get('seconds'))} | {_fmt(c.get('peak_gpu_memory_gb'))} | {c.get('what', '')} |\n")
    if len(methods) > 1:
        tradeoff_plot({n: m for n, m in methods.items() if n != "base model"}, fig / "tradeoff.png")
        lines.append("\n## Fidelity / editability\n\n![trade-off](figures/tradeoff.png)\n\n")
    lines.append("## Per prompt\n\n")
    k = s["images_per_prompt"]
    real_row = [square(photos[j % len(photos)], 256) for j in range(k)]
    for ep in prompts:
        rows = [("real photo", real_row)]
        for name, folder in (("DreamBooth", Path(run_dir) / "samples" / "final"), ("InstructPix2Pix", out / "instructpix2pix")):
            files = [folder / f"{ep.index:02d}_{s['seed'] + j}.png" for j in range(k)]
            if all(f.is_file() for f in files):
                rows.append((name, [Image.open(f) for f in files]))
        g = labelled_grid(rows, ep.prompt_no_token, fig / f"prompt_{ep.index:02d}.png")
        lines.append(f"**{ep.index:02d}. {ep.prompt_no_token}**\n\n![prompt {ep.index}](figures/{g.name})\n\n")
    path = out / "report.md"
    return write_text(path, "".join(lines))


def aggregate_compare(files: list[str | Path], out: str | Path) -> Path:
    """compare-bench: mean ± 95% CI per method and metric over subjects."""
    per: dict[str, dict[str, list[float]]] = {}
    subjects, calibrated = [], True
    for f in files:
        m = json.loads(Path(f).read_text())
        subjects.append(m["subject"])
        calibrated &= bool(m.get("calibrated"))
        for name, res in m["methods"].items():
            for key, v in res["metrics"].items():
                per.setdefault(name, {}).setdefault(key, []).append(v)
    return _ci_table(out, f"DreamBooth vs InstructPix2Pix: {len(subjects)} subjects", subjects, calibrated, per,
                     COMPARE_KEYS, COMPARE_LABELS)
