"""A run's exports: the diffusers pipeline folder, and which formats a run gets (the formats: single_file, lora)."""

from __future__ import annotations

import json
from pathlib import Path

from . import components
from .files import atomic_path
from .lora import export_lora, has_lora
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
