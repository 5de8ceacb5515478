"""dreambooth_pl.sharing: ModelSpec / kohya header keys, the model card, pushing to the Hub (offline here)."""

from __future__ import annotations

import huggingface_hub
import pytest

from dreambooth_pl import sharing
from dreambooth_pl.components import ModelLoadError

META = {"subject": "dog", "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5", "instance_prompt": "a sks dog",
        "class_prompt": "a dog", "resolution": 512, "steps": 800, "seed": 0, "git_sha": "abc"}


@pytest.mark.parametrize(("width", "prediction", "lora", "want"), [
    (768, "epsilon", False, "stable-diffusion-v1"), (768, "epsilon", True, "stable-diffusion-v1/lora"),
    (1024, "v_prediction", False, "stable-diffusion-v2-768-v"), (1024, "epsilon", False, "stable-diffusion-v2-512"),
    (32, "epsilon", False, "dreambooth_pl-custom-32")])
def test_architecture_ids(width, prediction, lora, want):
    assert sharing.architecture(width, prediction, lora) == want


def test_share_metadata_names_trigger_base_resolution_and_steps():
    keys = sharing.share_metadata(META, "stable-diffusion-v1", "diffusers")
    assert all(isinstance(v, str) for v in keys.values())  # safetensors headers are str -> str
    assert keys["modelspec.trigger_phrase"] == "a sks dog" and keys["modelspec.resolution"] == "512x512"
    assert keys["ss_sd_model_name"] == META["base_model"] and keys["ss_max_train_steps"] == "800"
    assert keys["modelspec.title"] == "dog (DreamBooth)" and keys["ss_resolution"] == "(512, 512)"


def test_model_card_has_front_matter_usage_scores_and_grid():
    card = sharing.model_card(META, {"dino": 0.61234, "clip_t": 0.3}, "samples.png")
    assert card.startswith("---\nbase_model: stable-diffusion-v1-5/stable-diffusion-v1-5\n")
    assert "instance_prompt: a sks dog\n" in card and "![samples](samples.png)" in card
    assert '"a sks dog on the beach"' in card and "| after fine-tuning | 0.612 | 0.300 |" in card


def test_push_to_hub_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"cannot be reached.*the export is complete locally.*huggingface-cli upload"):
        sharing.push_to_hub(tmp_path, "me/dog")
