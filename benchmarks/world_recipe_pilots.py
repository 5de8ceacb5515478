"""DreamBooth recipe pilots in the toy world: world.yaml's fine-tune with extra fit arguments on the validation
subjects (seed 0), judged as `make world-ablations` judges a point, plus which part of the subject is missing and the
share on the photos' own backgrounds. For levers the ablations' axes do not cover (EMA, LoRA, ...):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/world_recipe_pilots.py --name ema995 \\
        --fit-args="--model.optim.ema_decay 0.995" --out outputs/world/recipe_ema995.json

With no --fit-args it is world.yaml's own recipe (the reference the others are read against, same seeds and noise).
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from dreambooth_pl import world
from dreambooth_pl.judge import load_judge
from dreambooth_pl.world_ablations import UNSEEN, point
from dreambooth_pl.world_claims import (
    PARTS,
    ClaimsSettings,
    counts,
    finetune,
    measure_samples,
    protocol,
    sample_subject,
)


def share(measured: dict, metric: str, category: str) -> float:
    """The share of a category's images with `metric` true."""
    k, n = counts(measured, metric, category)
    return k / n


def pilot(fit_args: list[str], subjects: tuple[str, ...], images: int, data_root: str = "data/world") -> dict:
    """Per subject: the ablations' point (subject, context, drift, diversity on unseen backgrounds), each identity
    part right, the subject share on the photos' backgrounds, the fit's seconds; and their means."""
    if not (Path(data_root) / "subjects.csv").is_file():
        world.write_dataset(data_root)
    s = ClaimsSettings(subjects=subjects, images_per_prompt=images, class_prompt_images=8, fit_args=tuple(fit_args),
                       data_root=data_root)
    judge, proto = load_judge(), protocol(s)
    per = {}
    for subject in subjects:
        module, seconds = finetune(subject, "class_images", 0, s)  # the EMA weights when the fit args turn EMA on
        m = measure_samples(judge, subject, sample_subject(module.parts(), subject, s, 0, proto))
        per[subject] = {**point(m), **{p: share(m, p, UNSEEN) for p in PARTS}, "seen": share(m, "subject", "seen"),
                        "fit_seconds": seconds}
        print(subject, {k: round(v, 3) for k, v in per[subject].items()}, flush=True)
    mean = {k: float(np.mean([r[k] for r in per.values()])) for k in next(iter(per.values())) if k != "fit_seconds"}
    return {"per_subject": per, "mean": mean}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="world.yaml", help="the pilot's name in its record")
    p.add_argument("--fit-args", default="", help='fit arguments over world.yaml, one string: --fit-args="--a 1 --b 2"')
    p.add_argument("--subjects", nargs="+", default=list(world.VALIDATION_SUBJECTS), choices=list(world.ALL_SUBJECTS),
                   help="world subjects (default: the validation ones, what recipes are tuned on)")
    p.add_argument("--images", type=int, default=4, help="images per template")
    p.add_argument("--data-root", default="data/world", help="the world subjects (written there when missing)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="outputs/world/recipe_pilot.json", help="the figures, as JSON")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
        res = pilot(shlex.split(a.fit_args), tuple(a.subjects), a.images, a.data_root)
    res = {"name": a.name, "fit_args": a.fit_args, "subjects": a.subjects, "images_per_template": a.images, "seed": 0,
           **res, "minutes": (time.perf_counter() - start) / 60}
    print("mean", {k: round(v, 3) for k, v in res["mean"].items()}, flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
