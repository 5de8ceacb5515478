"""The project's own commands beside fit (and experiment.py's experiment and priors): evaluate, report, compare, export,
tiny-model, dreambench-files and the toy world's world-data, world-build and world-claims.

Each command is an `add_<name>_args(parser)` that declares its options and a `<name>(args)` that runs it;
`cli.py` puts them under one program.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from . import world
from . import world_models as world_model_recipes
from .backbones import BACKBONES
from .config import parse_run_config
from .data import list_images, load_image, write_benchmark_files
from .encoders import KINDS as ENCODER_KINDS
from .encoders import load_encoders
from .evaluation import FILE_RE, encoder_info, protocol_prompts, real_vs_real, reference_rows, score
from .export import export_checkpoint
from .files import write_json
from .instructpix2pix import DEFAULT_MODEL as IP2P_MODEL
from .instructpix2pix import compare as compare_run
from .report import aggregate, aggregate_compare, report_run
from .sharing import push_to_hub
from .tiny import TINY, TINY_MODELS, build_random
from .world_ablations import AblationSettings, run_ablations
from .world_claims import ClaimsSettings, run_claims

XL_IP2P_MODEL = BACKBONES["sdxl"].default_ip2p


# ------------------------------------------------------------------------------------------------ evaluate


def add_evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", help="folder of generated images (<prompt index>_<seed>.png, class_<seed>.png)")
    p.add_argument("--subject", required=True, help="folder of the subject's real photos")
    p.add_argument("--class-noun", help="class noun in the prompts, e.g. 'can'")
    p.add_argument("--type", default="object", choices=("object", "live"), help="which DreamBench prompt list")
    p.add_argument("--identifier", default="sks", help="the identifier in the prompts")
    p.add_argument("--prompts-dir", default="data/dreambooth", help="folder holding prompts_object.txt / prompts_live.txt")
    p.add_argument("--encoders", default="real", choices=ENCODER_KINDS, help="tiny: offline random encoders (uncalibrated)")
    p.add_argument("--real-vs-real", action="store_true", help="score the photos against each other (paper's real-image row)")
    p.add_argument("--out", default=None, help="metrics.json path (default: <images>/metrics.json)")


def _score_folder(a: argparse.Namespace, encoders: dict, real: list) -> dict:
    """Scores of a folder of <prompt index>_<seed>.png images (and class_<seed>.png for PRES)."""
    if not a.images or not a.class_noun:
        sys.exit("evaluate: --images and --class-noun are required (or --real-vs-real)")
    prompts = {ep.index: ep for ep in protocol_prompts(a.prompts_dir, a.type, a.identifier, a.class_noun)}
    groups: dict[int, list[tuple[int, Path]]] = {}
    for f in sorted(Path(a.images).iterdir()):
        if mt := FILE_RE.match(f.name):
            groups.setdefault(int(mt.group(1)), []).append((int(mt.group(2)), f))
    if not groups:
        sys.exit(f"evaluate: no <prompt index>_<seed>.png files in {a.images}: name generated images so")
    if bad := sorted(set(groups) - set(prompts)):
        sys.exit(f"evaluate: {a.images} has images for prompt indices {bad} but prompts_{a.type}.txt has "
                 f"{len(prompts)} prompts")
    triples = [(prompts[i], [s for s, _ in sorted(g)], [load_image(f) for _, f in sorted(g)]) for i, g in sorted(groups.items())]
    pres = [load_image(f) for f in sorted(Path(a.images).glob("class_*.png"))] or None
    scored = score(encoders, real, triples, pres)
    return {"images": a.images, "metrics": scored.metrics, "per_prompt": scored.per_prompt, "rows": scored.rows}


def evaluate(a: argparse.Namespace) -> None:
    """Score a folder of generated images (or the photos against each other) with the DreamBench protocol."""
    enc = load_encoders(a.encoders, device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    real = [load_image(x) for x in list_images(a.subject)]
    info = {"subject": a.subject, **encoder_info(enc), "reference": reference_rows(enc)}
    if a.real_vs_real:
        result = {**info, "real_vs_real": real_vs_real(enc, real), "num_photos": len(real)}
        out = Path(a.out or "metrics_real_vs_real.json")
    else:
        result = {**info, **_score_folder(a, enc, real)}
        out = Path(a.out or Path(a.images) / "metrics.json")
    write_json(out, result)
    print(json.dumps(result.get("metrics", result.get("real_vs_real")), indent=2))
    if not result["calibrated"]:
        print("(tiny random encoders: uncalibrated smoke numbers)")
    print(f"wrote {out}")


# ------------------------------------------------------------------------------------------------ report, compare


def add_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run folders (outputs/<subject>)")
    p.add_argument("--aggregate", default=None, help="write a mean ± 95%% CI table over the runs to this file")


def report(a: argparse.Namespace) -> None:
    """report.md + figures per run folder (a run of several subjects: one per subject, and a table over them), or
    one DreamBench table over the runs."""
    if a.aggregate:
        print(f"wrote {aggregate([Path(r) / 'metrics.json' for r in a.runs], a.aggregate)}")
        return
    for r in a.runs:
        for path in report_run(r):
            print(f"wrote {path}")


def add_compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="DreamBooth run folders (outputs/<subject>)")
    p.add_argument("--model", default=None, help=f"InstructPix2Pix hub id, folder, or tiny-ip2p / tiny-xl-ip2p / "
                   f"world-ip2p (offline); default: {IP2P_MODEL}, or {XL_IP2P_MODEL} for an SDXL run")
    p.add_argument("--encoders", default=None, choices=ENCODER_KINDS, help="default: the run's eval.encoders")
    p.add_argument("--steps", type=int, default=100, help="sampling steps per edit")
    p.add_argument("--guidance", type=float, default=7.5, help="text guidance")
    p.add_argument("--image-guidance", type=float, default=1.5, help="image guidance")
    p.add_argument("--batch-size", type=int, default=4, help="edits per batch")
    p.add_argument("--aggregate", default=None, help="only aggregate the runs' compare/metrics.json into this table")


def compare(a: argparse.Namespace) -> None:
    """InstructPix2Pix on DreamBooth runs' subjects, prompts, seeds and metrics."""
    if a.aggregate:
        print(f"wrote {aggregate_compare([Path(r) / 'compare' / 'metrics.json' for r in a.runs], a.aggregate)}")
        return
    for r in a.runs:
        path = compare_run(r, parse_run_config(r), model=a.model, encoders=a.encoders, steps=a.steps,
                           guidance_scale=a.guidance, image_guidance_scale=a.image_guidance, batch_size=a.batch_size)
        print(f"wrote {path}")


# ------------------------------------------------------------------------------------------------ models, data


def add_tiny_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="output folder")
    p.add_argument("--arch", default=TINY, choices=TINY_MODELS, help="which tiny model")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed")


def tiny_model(a: argparse.Namespace) -> None:
    """Write a tiny random Stable Diffusion (diffusers layout)."""
    path = build_random(a.arch, a.dir, seed=a.seed)
    print(f"Wrote the tiny random model ({a.arch}, seed {a.seed}) to {path}; random weights: for tests and demos only.")


def add_dreambench_files_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="a clone of the DreamBooth dataset repository")


def dreambench_files(a: argparse.Namespace) -> None:
    """Write subjects.csv and prompts_{object,live}.txt into a clone of the DreamBooth dataset repo."""
    for path in write_benchmark_files(a.root):
        print(f"wrote {path}")


# ------------------------------------------------------------------------------------------------ export


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a run's checkpoint: <run>/checkpoints/last.ckpt, a best or a mid-run one")
    p.add_argument("--out", help="folder of the exports (default: <run>/exports/step<N>)")
    p.add_argument("--no-single-file", action="store_true", help="skip <subject>.safetensors (A1111 / ComfyUI single file)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="then upload the exported folder to this Hub model repo "
                   "(created private if absent; needs `huggingface-cli login`)")


def export(a: argparse.Namespace) -> None:
    """Turn any saved checkpoint into the full set of exports (diffusers folder + single file, or LoRA files)."""
    paths = export_checkpoint(a.checkpoint, a.out, not a.no_single_file)
    for kind, path in paths.items():
        print(f"Exported {kind}: {path}")
    if a.push_to_hub:
        folder = next(iter(paths.values()))
        folder = folder if folder.is_dir() else folder.parent  # the diffusers folder, or lora/
        print(f"Pushed {folder} to {push_to_hub(folder, a.push_to_hub)}")


# ------------------------------------------------------------------------------------------------ the toy world


def add_world_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default="data/world", help="folder to write (DreamBench layout)")
    p.add_argument("--photos", type=int, default=5, help="photos per subject")
    p.add_argument("--seed", type=int, default=0, help="render seed")


def world_data(a: argparse.Namespace) -> None:
    """Write the toy world's subjects (photos, subjects.csv, prompts_world.txt) in the DreamBench layout."""
    print(f"wrote the world subjects {', '.join(world.SUBJECTS)} to {world.write_dataset(a.root, a.photos, a.seed)}")


def add_world_build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=str(world_model_recipes.WORLD_DIR), help="folder of sd/, ip2p/, judge/, manifest.json")
    p.add_argument("--device", default="cpu", help="torch device to train on (cpu, cuda)")
    p.add_argument("--reuse", nargs="+", default=[], choices=list(world_model_recipes.STAGES),
                   help="stages to keep from the build already in --out instead of training them again; refused "
                        "unless their recipe and every upstream one are unchanged (same seeds, so the same weights)")


def world_build(a: argparse.Namespace) -> None:
    """Train the toy world's models from scratch (VAE, text encoder + UNet, InstructPix2Pix UNet, judge)."""
    try:
        m = world_model_recipes.build_world(a.out, a.device, reuse=a.reuse)
    except world_model_recipes.ReuseError as e:
        raise SystemExit(f"world-build: {e}") from None
    judge = (m["judge"] or {}).get("accuracy") or {}
    print(f"wrote {Path(a.out)}: {m['weights_bytes'] / 2**20:.1f} MiB of weights in {m['wall_time_s']['total']:.0f} s"
          f" on {a.device}; final losses {json.dumps(m['losses'])}; judge accuracy {json.dumps(judge)}")


def add_world_claims_args(p: argparse.ArgumentParser) -> None:
    d = ClaimsSettings()
    p.add_argument("--subjects", nargs="+", default=list(d.subjects), choices=list(world.ALL_SUBJECTS),
                   help="world subjects (default: the reported ones; the validation ones are for tuning)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(d.seeds), help="seeds per subject")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: world.yaml's trainer.max_steps)")
    p.add_argument("--out", default="outputs/world", help="folder of claims.md, claims.json and the grids")


def world_claims(a: argparse.Namespace) -> None:
    """Measure DreamBooth's claims (and the InstructPix2Pix contrast) in the toy world against its judge."""
    steps = ("--trainer.max_steps", str(a.steps)) if a.steps else ()
    s = dataclasses.replace(ClaimsSettings(), subjects=tuple(a.subjects), seeds=tuple(a.seeds), fit_args=steps)
    print(f"wrote {run_claims(s, a.out)}")


def add_world_ablations_args(p: argparse.ArgumentParser) -> None:
    d = AblationSettings()
    p.add_argument("--subjects", nargs="+", default=list(d.subjects), choices=list(world.ALL_SUBJECTS),
                   help="world subjects (default: the validation ones)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(d.seeds), help="seeds per subject (paired)")
    p.add_argument("--out", default="outputs/world", help="folder of ablations.md, ablations.json and the figures")


def world_ablations(a: argparse.Namespace) -> None:
    """The ablations as curves in the toy world (steps, λ, learning rate, class images, prior, text encoder, captions)."""
    s = dataclasses.replace(AblationSettings(), subjects=tuple(a.subjects), seeds=tuple(a.seeds))
    print(f"wrote {run_ablations(s, a.out)}")


# name -> (declare options, run); the one-line help of each is cli.HELP's (the program's --help imports nothing heavy)
COMMANDS = {
    "evaluate": (add_evaluate_args, evaluate),
    "report": (add_report_args, report),
    "compare": (add_compare_args, compare),
    "export": (add_export_args, export),
    "tiny-model": (add_tiny_model_args, tiny_model),
    "dreambench-files": (add_dreambench_files_args, dreambench_files),
    "world-data": (add_world_data_args, world_data),
    "world-build": (add_world_build_args, world_build),
    "world-claims": (add_world_claims_args, world_claims),
    "world-ablations": (add_world_ablations_args, world_ablations),
}
