"""A run's exports: the diffusers pipeline folder, which formats a run gets (the formats: single_file, lora), and
the exports of any saved checkpoint (`python -m dreambooth_pl export`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from . import components
from .data import Subject, describe_subject, describe_subjects
from .files import atomic_path, image_grid, write_image, write_text
from .loggers import git_sha
from .lora import export_lora, has_lora
from .module import DreamBoothModule
from .sharing import CARD_FILE, architecture, model_card, share_metadata
from .single_file import export_single_file

METADATA_FILE = "dreambooth_pl.json"  # beside model_index.json: what the folder was trained on, and how
# The key layouts of the two single files (ModelSpec `implementation`): original LDM keys, kohya's LoRA keys.
LDM_IMPLEMENTATION = "https://github.com/Stability-AI/stablediffusion"
KOHYA_IMPLEMENTATION = "https://github.com/kohya-ss/sd-scripts"


def export_pipeline(parts: components.SDComponents, folder: str | Path, metadata: dict | None = None,
                    sampler: str = "default") -> Path:
    """Write a complete diffusers pipeline (StableDiffusionPipeline or StableDiffusionXLPipeline, safetensors) with
    `parts`' weights, atomically."""
    pipe = components.pipeline(parts, sampler=sampler)
    # An earlier export is replaced only once the new one is complete.
    with atomic_path(folder, folder=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata or {}, indent=2, default=str))
    return Path(folder)


def export_run(module, out_dir: str | Path, metadata: dict, single_file: bool = True) -> dict[str, Path]:
    """Every export of a fine-tuned `DreamBoothModule` into `out_dir`: {format: path}.

    A LoRA run gets `lora/` (diffusers and kohya files); a full fine-tune gets `model/` (diffusers, with a model card)
    and, with `single_file`, `<subject>.safetensors` (one fp16 original-layout file for A1111 / ComfyUI). The
    safetensors headers carry ModelSpec and kohya keys (trigger phrase, base model, resolution, steps).
    """
    out_dir = Path(out_dir)
    hp = module.hparams
    meta = {"base_model": hp.pretrained, "revision": hp.revision, **metadata}
    width = module.unet.config.get("cross_attention_dim") or module.unet.config.get("joint_attention_dim")
    arch = dict(cross_attention_dim=width, prediction_type=module.parts().prediction_type, backbone=module.backbone.name)
    if has_lora(module.unet) or any(has_lora(e) for e in module.trainable_text_encoders):
        keys = share_metadata(meta, architecture(**arch, lora=True), KOHYA_IMPLEMENTATION)
        paths = {f"lora ({kind})": path for kind, path in
                 export_lora(module, out_dir / "lora", metadata=keys, kohya_name=f"{share_name(meta)}_lora.safetensors").items()}
        write_card(out_dir, out_dir / "lora", meta, module.backbone.pipelines["text2img"])
        return paths
    parts = module.export_parts()  # one dtype throughout: a mixed bf16/fp32 pipeline fails on its first call
    paths = {"diffusers": export_pipeline(parts, out_dir / "model", meta)}
    write_card(out_dir, out_dir / "model", meta, module.backbone.pipelines["text2img"])
    if single_file:
        keys = {**{k: str(v) for k, v in meta.items()}, **share_metadata(meta, architecture(**arch), LDM_IMPLEMENTATION)}
        paths["single file"] = export_single_file(parts, out_dir / f"{share_name(meta)}.safetensors", metadata=keys)
    return paths


def share_name(meta: dict) -> str:
    """The single files' name: the subject's (`dog.safetensors`, `dog_lora.safetensors`), safe as a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(meta.get("subject") or "model")).strip("._") or "model"


def write_card(run_dir: Path, folder: Path, meta: dict, pipeline_class: str = "StableDiffusionPipeline") -> Path:
    """folder/README.md: the model card, with the run's final scores and a grid of its final samples when it has them."""
    metrics = None
    mfile = run_dir / "metrics.json"
    if mfile.is_file():
        final = json.loads(mfile.read_text()).get("stages", {}).get("final", {})
        metrics = {k: v for k, v in final.get("metrics", {}).items() if isinstance(v, float)} or None
    samples = sorted((run_dir / "samples" / "final").glob("[0-9]*_*.png"))[:8]
    grid = None
    if samples:
        write_image(image_grid(samples, cols=4, size=256), folder / "samples.png")
        grid = "samples.png"
    return write_text(folder / CARD_FILE, model_card(meta, metrics, grid, pipeline_class))


def checkpoint_metadata(ckpt: dict, path: Path) -> dict:
    """Who and what a checkpoint is (subject, prompts, step), from the hyperparameters it carries."""
    d = ckpt.get("datamodule_hyper_parameters", {})
    who = describe_subject(d.get("subject"), d["class_noun"], d.get("identifier", "sks")) if "class_noun" in d else {}
    if d.get("subjects"):  # a run of several subjects: every trigger phrase
        who = describe_subjects(d.get("subject"), [Subject(**s) for s in d["subjects"]])
    return {**who, "resolution": d.get("resolution"), "steps": ckpt.get("global_step"), "checkpoint": str(path),
            "git_sha": git_sha()}


def export_checkpoint(path: str | Path, out_dir: str | Path | None = None, single_file: bool = True) -> dict[str, Path]:
    """Every export of a saved checkpoint (last, best or mid-run) into `out_dir` (default: the run folder's
    exports/step<N>/): {format: path}."""
    path = Path(path)
    module, ckpt = DreamBoothModule.from_checkpoint(path)
    step = int(ckpt.get("global_step", 0))
    out = Path(out_dir) if out_dir else path.resolve().parent.parent / "exports" / f"step{step:06d}"
    return export_run(module, out, checkpoint_metadata(ckpt, path), single_file)
