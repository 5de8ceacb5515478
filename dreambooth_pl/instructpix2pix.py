"""InstructPix2Pix baseline: edit the real photos by instruction, on DreamBooth's prompts, seeds and metrics."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from . import components
from .backbones import BACKBONES
from .data import class_prompt, list_images, load_image
from .encoders import load_encoders
from .evaluation import EvalPrompt, encoder_info, protocol_prompts, reference_rows, score
from .files import square, write_image, write_json
from .loggers import AutoWandbLogger, finish_wandb
from .metrics import DirectionalSimilarity, PairedCosine
from .report import write_compare_report
from .world import TEMPLATES as WORLD_TEMPLATES

DEFAULT_MODEL = BACKBONES["sd"].default_ip2p  # timbrooks/instruct-pix2pix

# Every DreamBench template (object and live lists) -> the edit that turns a photo of the subject
# into the prompt's scene. A template without an entry is an error, never a silent skip.
INSTRUCTIONS: dict[str, str] = {
    "a {0} {1} in the jungle": "put it in the jungle",
    "a {0} {1} in the snow": "put it in the snow",
    "a {0} {1} on the beach": "put it on the beach",
    "a {0} {1} on a cobblestone street": "put it on a cobblestone street",
    "a {0} {1} on top of pink fabric": "put it on top of pink fabric",
    "a {0} {1} on top of a wooden floor": "put it on top of a wooden floor",
    "a {0} {1} with a city in the background": "add a city in the background",
    "a {0} {1} with a mountain in the background": "add a mountain in the background",
    "a {0} {1} with a blue house in the background": "add a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest": "put it on top of a purple rug in a forest",
    "a {0} {1} with a wheat field in the background": "add a wheat field in the background",
    "a {0} {1} with a tree and autumn leaves in the background": "add a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background": "add the Eiffel Tower in the background",
    "a {0} {1} floating on top of water": "make it float on top of water",
    "a {0} {1} floating in an ocean of milk": "make it float in an ocean of milk",
    "a {0} {1} on top of green grass with sunflowers around it": "put it on green grass with sunflowers around it",
    "a {0} {1} on top of a mirror": "put it on top of a mirror",
    "a {0} {1} on top of the sidewalk in a crowded street": "put it on the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road": "put it on top of a dirt road",
    "a {0} {1} on top of a white rug": "put it on top of a white rug",
    "a red {0} {1}": "make it red",
    "a purple {0} {1}": "make it purple",
    "a shiny {0} {1}": "make it shiny",
    "a wet {0} {1}": "make it wet",
    "a cube shaped {0} {1}": "make it cube shaped",
    "a {0} {1} wearing a red hat": "give it a red hat",
    "a {0} {1} wearing a santa hat": "give it a santa hat",
    "a {0} {1} wearing a rainbow scarf": "give it a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle": "give it a black top hat and a monocle",
    "a {0} {1} in a chef outfit": "dress it in a chef outfit",
    "a {0} {1} in a firefighter outfit": "dress it in a firefighter outfit",
    "a {0} {1} in a police outfit": "dress it in a police outfit",
    "a {0} {1} wearing pink glasses": "give it pink glasses",
    "a {0} {1} wearing a yellow shirt": "dress it in a yellow shirt",
    "a {0} {1} in a purple wizard outfit": "dress it in a purple wizard outfit",
}


# The toy world's templates carry their instruction in its vocabulary file.
INSTRUCTIONS.update({t["template"]: t["instruction"] for t in WORLD_TEMPLATES})


def instruction_for(template: str) -> str:
    """The edit instruction of a benchmark template; a clear error when the table lacks it."""
    key = " ".join(template.split())
    if key not in INSTRUCTIONS:
        raise KeyError(f"no InstructPix2Pix instruction for the template {template!r}: add it to "
                       f"INSTRUCTIONS in dreambooth_pl/instructpix2pix.py")
    return INSTRUCTIONS[key]


@dataclass
class Edit:
    """One image to make: prompt index, seed, which real photo, the instruction."""

    prompt_index: int
    seed: int
    photo_index: int
    instruction: str

    @property
    def filename(self) -> str:
        return f"{self.prompt_index:02d}_{self.seed}.png"  # the evaluation's naming: <prompt index>_<seed>.png


def plan(prompts: list[EvalPrompt], num_photos: int, images_per_prompt: int = 4, seed: int = 0) -> list[Edit]:
    """Image k of every prompt edits photo k mod #photos with seed + k: DreamBooth's count and seeds."""
    return [Edit(ep.index, seed + k, k % num_photos, instruction_for(ep.template))
            for ep in prompts for k in range(images_per_prompt)]


EDIT_SETTINGS = "edit_settings.json"  # in an edits folder: the sampling settings its images were made with


class EditFolderError(ValueError):
    """An edits folder holds images made with other sampling settings than the ones asked for."""


def check_edit_folder(out: Path, settings: dict, edits: list[Edit]) -> None:
    """Refuse `out` if it holds edits made with other `settings` (or with unrecorded ones); else record them."""
    record = out / EDIT_SETTINGS
    made = [e for e in edits if (out / e.filename).is_file()]
    if made:
        old = json.loads(record.read_text()) if record.is_file() else None
        if old != settings:
            diff = ("its settings are not recorded (made by an earlier version)" if old is None else
                    "; ".join(f"{k}: folder has {old.get(k)}, this run asks {v}" for k, v in settings.items()
                              if old.get(k) != v))
            raise EditFolderError(f"{out} holds {len(made)} InstructPix2Pix edits made with other settings ({diff}). "
                                  f"Delete {out} to remake them, or write this run's edits elsewhere.")
    write_json(record, settings)


@dataclass
class RunStats:
    seconds: float
    images: int
    peak_gpu_memory_gb: float | None


@torch.inference_mode()
def run(pipe, edits: list[Edit], photos: list[Image.Image], out: str | Path, resolution: int = 512,
        guidance_scale: float = 7.5, image_guidance_scale: float = 1.5, steps: int = 100,
        batch_size: int = 4) -> RunStats:
    """Make the missing edits (resumable: existing files are kept), each from its own CPU generator. A folder whose
    edits were made with other sampling settings is refused (`EditFolderError`), never silently reused."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_edit_folder(out, {"guidance_scale": guidance_scale, "image_guidance_scale": image_guidance_scale,
                            "steps": steps, "resolution": resolution}, edits)
    todo = [e for e in edits if not (out / e.filename).is_file()]
    inputs = [square(p, resolution) for p in photos]
    cuda = pipe.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        images = pipe(
            prompt=[e.instruction for e in chunk], image=[inputs[e.photo_index] for e in chunk],
            num_inference_steps=steps, guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(e.seed) for e in chunk], output_type="pil",
        ).images
        for e, img in zip(chunk, images, strict=True):
            write_image(img, out / e.filename)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return RunStats(seconds=seconds, images=len(todo), peak_gpu_memory_gb=peak)


def load(pretrained: str = DEFAULT_MODEL, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         revision: str | None = None):
    """The InstructPix2Pix pipeline, loaded through components like every model."""
    parts = components.load_components(pretrained, revision=revision, dtype=dtype)
    latent = parts.vae.config.latent_channels
    if parts.unet.config.in_channels != 2 * latent:
        raise components.ModelLoadError(
            f"'{pretrained}' is not an InstructPix2Pix model: its UNet takes {parts.unet.config.in_channels} "
            f"input channels, InstructPix2Pix needs {2 * latent} (noisy latents + image latents, {latent} each)")
    return components.pipeline(parts, kind="instruct_pix2pix").to(device)


def _images(folder: Path, prompts: list[EvalPrompt], k: int, seed: int) -> list[list[Image.Image]] | None:
    files = [[folder / f"{ep.index:02d}_{seed + j}.png" for j in range(k)] for ep in prompts]
    if not all(f.is_file() for fs in files for f in fs):
        return None
    return [[Image.open(f).convert("RGB") for f in fs] for fs in files]


@torch.inference_mode()
def score_method(encoders: dict, photos: list[Image.Image], prompts: list[EvalPrompt], images: list[list[Image.Image]],
                 class_prompt: str, resolution: int) -> dict:
    """Both methods on each other's terms: DreamBench scores (CLIP-T against the prompt with the class noun)
    plus InstructPix2Pix's CLIP directional similarity and CLIP image similarity to the input photo
    (image k of a prompt is paired with photo k mod #photos, the photo InstructPix2Pix edited)."""
    groups = [(EvalPrompt(ep.index, ep.prompt_no_token, ep.prompt_no_token, ep.template), list(range(len(ims))), ims)
              for ep, ims in zip(prompts, images, strict=True)]
    scored = score(encoders, photos, groups)
    clip = encoders["clip"]
    src = clip.encode_images([square(p, resolution) for p in photos])  # (P, D)
    src_txt = clip.encode_texts([class_prompt])  # (1, D)
    direction, to_input = DirectionalSimilarity(), PairedCosine()
    for (ep, _, ims), pp in zip(groups, scored.per_prompt, strict=True):
        out = clip.encode_images(ims)  # (k, D)
        pair_src = src[[j % len(photos) for j in range(len(ims))]]  # (k, D)
        tgt_txt = clip.encode_texts([ep.prompt])
        d, t = DirectionalSimilarity(), PairedCosine()
        for m in (direction, d):
            m.update(pair_src, out, src_txt.expand_as(out), tgt_txt.expand_as(out))
        for m in (to_input, t):
            m.update(pair_src, out)
        pp["clip_dir"], pp["clip_img_input"] = float(d.compute()), float(t.compute())
    metrics = {k: v for k, v in scored.metrics.items() if k != "clip_t_no_token"}
    metrics.update(clip_dir=float(direction.compute()), clip_img_input=float(to_input.compute()))
    return {"metrics": metrics, "per_prompt": scored.per_prompt}


def _cost(run_dir: Path, out: Path, stats: RunStats, steps: int) -> dict:
    """Wall time and peak memory of each method: the fit's run.json; the edits just made (or recorded before)."""
    fit = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    recorded = out / "metrics.json"
    # A rerun that made no new edits keeps the cost recorded when they were made.
    ip2p = json.loads(recorded.read_text()).get("cost", {}).get("InstructPix2Pix") if (
        recorded.is_file() and stats.images == 0) else None
    return {
        "DreamBooth": {"seconds": fit.get("fit_seconds"), "peak_gpu_memory_gb": fit.get("peak_gpu_memory_gb"),
                       "what": f"fine-tuning, {fit['steps']} steps" if fit else "no run.json in the run folder (fit predates it)"},
        "InstructPix2Pix": ip2p or {"seconds": stats.seconds, "peak_gpu_memory_gb": stats.peak_gpu_memory_gb,
                                    "what": f"{stats.images} edits, {steps} steps each, no training"},
    }


def default_model(pretrained: str, single_file_config: str | None = None) -> str:
    """The InstructPix2Pix baseline for a DreamBooth run on `pretrained`: the SDXL one for an SDXL base model."""
    return components.backbone_of_model(pretrained, single_file_config).default_ip2p


def compare(run_dir: str | Path, config, model: str | None = None, encoders: str | None = None, steps: int = 100,
            guidance_scale: float = 7.5, image_guidance_scale: float = 1.5, batch_size: int = 4,
            device: str | None = None) -> Path:
    """Run the baseline on a DreamBooth run's subject, score base / DreamBooth / InstructPix2Pix alike, report.

    `config` is the run's parsed config.yaml (`config.parse_run_config`); `model` None: `default_model` of its base.
    """
    model = model or default_model(config.model.pretrained, config.model.single_file_config)
    run_dir, d, ev = Path(run_dir), config.data, config.eval
    k, seed, res = ev.protocol.images_per_prompt, ev.protocol.seed, d.resolution
    prompts = protocol_prompts(ev.prompts_dir, d.subject_type, d.identifier, d.class_noun)
    photos = [load_image(p) for p in list_images(d.instance_dir)]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = run_dir / "compare"
    edits = plan(prompts, len(photos), k, seed)
    pipe = load(model, device=dev, dtype=torch.float16 if dev.type == "cuda" else torch.float32)
    stats = run(pipe, edits, photos, out / "instructpix2pix", resolution=res, guidance_scale=guidance_scale,
                image_guidance_scale=image_guidance_scale, steps=steps, batch_size=batch_size)
    del pipe
    enc = load_encoders(encoders or ev.encoders, device=dev)
    methods = {}
    for name, folder in (("base model", run_dir / "samples" / "base"), ("DreamBooth", run_dir / "samples" / "final"),
                         ("InstructPix2Pix", out / "instructpix2pix")):
        ims = _images(folder, prompts, k, seed)
        if ims is not None:
            methods[name] = score_method(enc, photos, prompts, ims, class_prompt(d.class_noun), res)
    payload = {"subject": d.subject, "class_noun": d.class_noun, "model": model, **encoder_info(enc),
               "reference": reference_rows(enc),
               "settings": {"images_per_prompt": k, "seed": seed, "steps": steps, "guidance_scale": guidance_scale,
                            "image_guidance_scale": image_guidance_scale, "resolution": res},
               "edits": [e.__dict__ for e in edits], "methods": methods, "cost": _cost(run_dir, out, stats, steps)}
    write_json(out / "metrics.json", payload)
    _log_wandb(payload, out)
    return write_compare_report(run_dir, payload, prompts, photos)


def _log_wandb(payload: dict, out: Path) -> None:
    """The baseline as its own W&B run, grouped with the subject's DreamBooth run (method in the config)."""
    finish_wandb()  # WandbLogger would otherwise log into a run still open in this process
    logger = AutoWandbLogger(save_dir=str(out), name=f"{payload['subject']}-instructpix2pix", group=payload["subject"])
    logger.log_hyperparams({"method": "instructpix2pix", "model": payload["model"], **payload["settings"]})
    ip = payload["methods"].get("InstructPix2Pix", {})
    logger.log_metrics({f"val/{k}": v for k, v in ip.get("metrics", {}).items()})
    rows = [[p["prompt"], p.get("dino"), p.get("clip_i"), p.get("clip_t"), p.get("clip_dir")] for p in ip.get("per_prompt", [])]
    logger.log_table("per_prompt", columns=["prompt", "dino", "clip_i", "clip_t", "clip_dir"], data=rows)
    logger.experiment.finish()
