"""A run's exports: the diffusers pipeline folder, which formats a run gets (the formats: single_file, lora), and
the exports of any saved checkpoint (`python -m dreambooth_pl export`)."""

from __future__ import annotations

import json
from pathlib import Path

from . import components
from .data import class_prompt, instance_prompt
from .files import atomic_path
from .loggers import git_sha
from .lora import export_lora, has_lora
from .module import DreamBoothModule
from .single_file import export_single_file

METADATA_FILE = "dreambooth_pl.json"  # beside model_index.json: what the folder was trained on, and how


def export_pipeline(parts: components.SDComponents, folder: str | Path, metadata: dict | None = None,
                    sampler: str = "default") -> Path:
    """Write a complete diffusers `StableDiffusionPipeline` (safetensors) with `parts`' weights, atomically."""
    pipe = components.pipeline(parts, sampler=sampler)
    # An earlier export is replaced only once the new one is complete.
    with atomic_path(folder, folder=True) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata or {}, indent=2, default=str))
    return Path(folder)


def export_run(module, out_dir: str | Path, metadata: dict, single_file: bool = True) -> dict[str, Path]:
    """Every export of a fine-tuned `DreamBoothModule` into `out_dir`: {format: path}.

    A LoRA run gets `lora/` (diffusers and kohya files); a full fine-tune gets `model/` (diffusers) and, with
    `single_file`, `model.safetensors` (one fp16 original-layout file for A1111 / ComfyUI).
    """
    out_dir = Path(out_dir)
    if has_lora(module.unet) or has_lora(module.text_encoder):
        return {f"lora ({kind})": path for kind, path in export_lora(module, out_dir / "lora").items()}
    hp = module.hparams
    meta = {"base_model": hp.pretrained, "revision": hp.revision, **metadata}
    parts = module.export_parts()  # one dtype throughout: a mixed bf16/fp32 pipeline fails on its first call
    paths = {"diffusers": export_pipeline(parts, out_dir / "model", meta)}
    if single_file:
        paths["single file"] = export_single_file(parts, out_dir / "model.safetensors",
                                                  metadata={k: str(v) for k, v in meta.items()})
    return paths


def checkpoint_metadata(ckpt: dict, path: Path) -> dict:
    """Who and what a checkpoint is (subject, prompts, step), from the hyperparameters it carries."""
    d = ckpt.get("datamodule_hyper_parameters", {})
    who = {}
    if "class_noun" in d:
        who = dict(subject=d.get("subject"), class_noun=d["class_noun"], identifier=d.get("identifier", "sks"),
                   instance_prompt=instance_prompt(d.get("identifier", "sks"), d["class_noun"]),
                   class_prompt=class_prompt(d["class_noun"]))
    return {**who, "steps": ckpt.get("global_step"), "checkpoint": str(path), "git_sha": git_sha()}


def export_checkpoint(path: str | Path, out_dir: str | Path | None = None, single_file: bool = True) -> dict[str, Path]:
    """Every export of a saved checkpoint (last, best or mid-run) into `out_dir` (default: the run folder's
    exports/step<N>/): {format: path}."""
    path = Path(path)
    module, ckpt = DreamBoothModule.from_checkpoint(path)
    step = int(ckpt.get("global_step", 0))
    out = Path(out_dir) if out_dir else path.resolve().parent.parent / "exports" / f"step{step:06d}"
    return export_run(module, out, checkpoint_metadata(ckpt, path), single_file)
