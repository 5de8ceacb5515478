"""Sharing a fine-tuned model: the metadata keys A1111, ComfyUI and kohya read, a model card, the Hugging Face Hub."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import huggingface_hub

from .components import ModelLoadError, hub_reachable

# ModelSpec architecture ids (Stability AI's "SAI Model Spec" 1.0) by the UNet's text width and prediction type.
ARCHITECTURES = {(768, "epsilon"): "stable-diffusion-v1", (1024, "epsilon"): "stable-diffusion-v2-512",
                 (1024, "v_prediction"): "stable-diffusion-v2-768-v", (2048, "epsilon"): "stable-diffusion-xl-v1-base"}
CARD_FILE = "README.md"


# The flow-matching transformers' ModelSpec ids, by backbone.
FLOW_ARCHITECTURES = {"sd3": "stable-diffusion-v3-medium", "flux": "flux-1-dev"}


def architecture(cross_attention_dim: int, prediction_type: str, lora: bool = False, backbone: str = "sd") -> str:
    """The ModelSpec architecture id of an SD 1.x / 2.x / XL fine-tune (by its UNet's text width and prediction type),
    or an SD3 / Flux one (by backbone); its LoRA: '/lora'; others are named as custom."""
    arch = FLOW_ARCHITECTURES.get(backbone) or ARCHITECTURES.get(
        (int(cross_attention_dim), prediction_type), f"dreambooth_pl-custom-{cross_attention_dim}")
    return f"{arch}/lora" if lora else arch


def share_metadata(meta: dict, arch: str, implementation: str) -> dict[str, str]:
    """safetensors header keys for `meta` (a run's export metadata): ModelSpec's `modelspec.*` and kohya's `ss_*`,
    so a UI shows the trigger phrase, base model, resolution and steps."""
    subject, res = meta.get("subject") or "dreambooth", meta.get("resolution")
    keys = {
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch, "modelspec.implementation": implementation,
        "modelspec.title": f"{subject} (DreamBooth)",
        "modelspec.description": f"DreamBooth fine-tune of {meta.get('base_model')} on {subject}: "
                                 f"prompt '{meta.get('instance_prompt')}'",
        "modelspec.trigger_phrase": str(meta.get("instance_prompt", "")),
        "modelspec.date": datetime.date.today().isoformat(),
        "ss_output_name": subject, "ss_sd_model_name": str(meta.get("base_model")),
        "ss_max_train_steps": str(meta.get("steps")), "ss_seed": str(meta.get("seed")),
    }
    if res:
        keys["modelspec.resolution"] = f"{res}x{res}"
        keys["ss_resolution"] = f"({res}, {res})"
    return keys


def model_card(meta: dict, metrics: dict | None, sample_grid: str | None,
               pipeline_class: str = "StableDiffusionPipeline") -> str:
    """README.md for an exported diffusers folder: Hub front matter, trigger phrase, how to load, settings, scores."""
    prompt, base = meta.get("instance_prompt", "a sks <class>"), meta.get("base_model")
    lines = ["---\n", f"base_model: {base}\n", "library_name: diffusers\n", f"instance_prompt: {prompt}\n",
             "tags:\n- dreambooth\n- dreambooth_pl\n- text-to-image\n- stable-diffusion\n", "---\n\n",
             f"# {meta.get('subject', 'DreamBooth')}: DreamBooth fine-tune of `{base}`\n\n",
             f"Trigger phrase: **`{prompt}`** (the class prompt `{meta.get('class_prompt')}` keeps the prior). "
             f"Trained with dreambooth_pl for {meta.get('steps')} steps at {meta.get('resolution')} px, seed "
             f"{meta.get('seed')}, git {meta.get('git_sha')}.\n\n",
             f"```python\nfrom diffusers import {pipeline_class}\n\n"
             f"pipe = {pipeline_class}.from_pretrained(\"<this folder or repo>\")\n"
             f"image = pipe(\"{prompt} on the beach\").images[0]\n```\n\n"]
    if sample_grid:
        lines.append(f"![samples]({sample_grid})\n\n")
    if metrics:
        lines.append("| | " + " | ".join(metrics) + " |\n|---|" + "---:|" * len(metrics) + "\n| after fine-tuning | "
                     + " | ".join(f"{v:.3f}" for v in metrics.values()) + " |\n\n")
    settings = {k: v for k, v in meta.items() if k not in ("instance_prompt", "class_prompt", "base_model")}
    lines.append("Settings:\n\n```json\n" + json.dumps(settings, indent=2, default=str) + "\n```\n")
    return "".join(lines)


def push_to_hub(folder: str | Path, repo_id: str, private: bool = True) -> str:
    """Upload an exported folder to the Hub (a new private model repo unless it exists); its URL. Offline: one
    clear error, no retries."""
    if huggingface_hub.constants.HF_HUB_OFFLINE or not hub_reachable():
        raise ModelLoadError(f"Cannot push {folder} to the Hugging Face Hub as '{repo_id}': the Hub "
                             f"({huggingface_hub.constants.ENDPOINT}) cannot be reached from here (or HF_HUB_OFFLINE "
                             f"is set); the export is complete locally, push it later with `huggingface-cli upload "
                             f"{repo_id} {folder}`.")
    url = huggingface_hub.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model")
    return str(url)
