"""DreamBooth recipe pilots in the toy world: world.yaml's fine-tune with extra fit arguments on the validation
subjects (seed 0), judged as `make world-ablations` judges a point, plus which part of the subject is missing and the
share on the photos' own backgrounds. For levers the ablations' axes do not cover (EMA, LoRA, ...):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/world_recipe_pilots.py --name ema995 \\
        --fit-args="--model.optim.ema_decay 0.995" --out outputs/world/recipe_ema995.json

With no --fit-args it is world.yaml's own recipe (the reference the others are read against, same seeds and noise).
--snapshots judges a longer fit on its way as well (a lower rate for longer, read at several lengths):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/world_recipe_pilots.py --name "lr x0.3" --seed 1 \
        --fit-args="--model.optim.learning_rate 1.5e-4 --trainer.max_steps 2400" --snapshots 800 1600
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
from dreambooth_pl.world_ablations import UNSEEN, Snapshots, point
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


def figures(judge, module, subject: str, s: ClaimsSettings, seed: int, proto) -> dict[str, float]:
    """One model's figures: the ablations' point on unseen backgrounds, each identity part right there, and the subject
    share on the photos' own backgrounds."""
    m = measure_samples(judge, subject, sample_subject(module.parts(), subject, s, seed, proto))
    return {**point(m), **{p: share(m, p, UNSEEN) for p in PARTS}, "seen": share(m, "subject", "seen")}


def means(per: dict[str, dict]) -> dict[str, float]:
    """Each figure's mean over subjects (the fit's seconds left out)."""
    return {k: float(np.mean([r[k] for r in per.values()])) for k in next(iter(per.values())) if k != "fit_seconds"}


def pilot(fit_args: list[str], subjects: tuple[str, ...], images: int, data_root: str = "data/world", seed: int = 0,
          snapshots: tuple[int, ...] = ()) -> dict:
    """Per subject: `figures` after the fit (and after each of `snapshots`' optimizer steps on the way), the fit's
    seconds; and their means over subjects."""
    if not (Path(data_root) / "subjects.csv").is_file():
        world.write_dataset(data_root)
    s = ClaimsSettings(subjects=subjects, images_per_prompt=images, class_prompt_images=8, fit_args=tuple(fit_args),
                       data_root=data_root)
    judge, proto = load_judge(), protocol(s)
    per, at_step = {}, {}
    for subject in subjects:
        def record(module, step, subject=subject):
            at_step.setdefault(step, {})[subject] = figures(judge, module, subject, s, seed, proto)

        # the EMA weights when the fit args turn EMA on (finetune returns them, Snapshots measure them)
        module, seconds = finetune(subject, "class_images", seed, s, callbacks=[Snapshots(snapshots, record)])
        per[subject] = {**figures(judge, module, subject, s, seed, proto), "fit_seconds": seconds}
        print(subject, {k: round(v, 3) for k, v in per[subject].items()}, flush=True)
    return {"per_subject": per, "mean": means(per),
            "snapshots": {step: {"per_subject": p, "mean": means(p)} for step, p in sorted(at_step.items())}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="world.yaml", help="the pilot's name in its record")
    p.add_argument("--fit-args", default="", help='fit arguments over world.yaml, one string: --fit-args="--a 1 --b 2"')
    p.add_argument("--subjects", nargs="+", default=list(world.VALIDATION_SUBJECTS), choices=list(world.ALL_SUBJECTS),
                   help="world subjects (default: the validation ones, what recipes are tuned on)")
    p.add_argument("--images", type=int, default=4, help="images per template")
    p.add_argument("--seed", type=int, default=0, help="fine-tuning and sampling seed (paired across pilots)")
    p.add_argument("--snapshots", type=int, nargs="*", default=[],
                   help="also judge the fit after these optimizer steps (before its last), as the ablations' steps axis")
    p.add_argument("--data-root", default="data/world", help="the world subjects (written there when missing)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="outputs/world/recipe_pilot.json", help="the figures, as JSON")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
        res = pilot(shlex.split(a.fit_args), tuple(a.subjects), a.images, a.data_root, a.seed, tuple(a.snapshots))
    res = {"name": a.name, "fit_args": a.fit_args, "subjects": a.subjects, "images_per_template": a.images, "seed": a.seed,
           **res, "minutes": (time.perf_counter() - start) / 60}
    for step, snap in res["snapshots"].items():
        print(f"mean at step {step}", {k: round(v, 3) for k, v in snap["mean"].items()}, flush=True)
    print("mean", {k: round(v, 3) for k, v in res["mean"].items()}, flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
