"""dreambooth_pl.export: the diffusers pipeline folder (atomic, with metadata) and which formats a run gets."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from pytorch_lightning.callbacks import ModelCheckpoint
from safetensors import safe_open
from safetensors.torch import load_file

from dreambooth_pl import cli, components
from dreambooth_pl.export import METADATA_FILE, export_pipeline, export_run
from dreambooth_pl.module import DreamBoothModule, LoraSettings, Optimization

from .conftest import make_datamodule, make_trainer


@pytest.fixture
def tuned(tiny_dir) -> DreamBoothModule:
    """A full fine-tune stand-in: the tiny module with every UNet weight moved off the pretrained one."""
    m = DreamBoothModule(pretrained="tiny")
    with torch.no_grad():
        for p in m.unet.parameters():
            p.add_(0.01)
    return m


def assert_same_weights(pipe, module) -> None:
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(module, name).state_dict(), getattr(pipe, name).state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(got[k], v) for k, v in want.items()), name


def test_export_pipeline_round_trip(tuned, tiny_dir, tmp_path):
    out = export_pipeline(tuned.parts(), tmp_path / "export" / "model", metadata={"subject": "t"})
    assert out == tmp_path / "export" / "model"
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["model"]  # no temp folders left
    assert list(out.rglob("*.safetensors")) and not list(out.rglob("*.bin"))
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert all(torch.equal(v, tuned.unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items())
    assert_same_weights(pipe, tuned)
    base = StableDiffusionPipeline.from_pretrained(tiny_dir).unet.conv_in.weight
    assert torch.equal(pipe.unet.conv_in.weight, base + 0.01)  # the module's weights, not the pretrained ones
    assert json.loads((out / METADATA_FILE).read_text()) == {"subject": "t"}
    assert METADATA_FILE == "dreambooth_pl.json"
    img = pipe("a sks can", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert img.shape == (1, 64, 64, 3)
    # A second export replaces the first atomically.
    tuned.unet.conv_out.bias.data.add_(1.0)
    export_pipeline(tuned.parts(), out)
    reloaded = StableDiffusionPipeline.from_pretrained(out)
    assert torch.equal(reloaded.unet.conv_out.bias, tuned.unet.conv_out.bias)
    assert json.loads((out / METADATA_FILE).read_text()) == {}
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["model"]


def test_export_pipeline_replaces_a_folder_only_when_complete(tuned, tmp_path, monkeypatch):
    out = export_pipeline(tuned.parts(), tmp_path / "model", metadata={"step": 1})
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def crash(self, save_directory, **kw):
        os.makedirs(save_directory, exist_ok=True)
        (save_directory / "model_index.json").write_text("{}")  # half a pipeline
        raise OSError("disk full")

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", crash)
    tuned.unet.conv_out.bias.data.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        export_pipeline(tuned.parts(), out, metadata={"step": 2})
    assert os.listdir(tmp_path) == ["model"]  # the temporary folder is gone
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    monkeypatch.undo()
    assert json.loads((out / METADATA_FILE).read_text()) == {"step": 1}


def test_export_run_full_fine_tune_gets_model_and_single_file(tuned, tmp_path):
    paths = export_run(tuned, tmp_path, {"subject": "t", "steps": 3})
    assert paths == {"diffusers": tmp_path / "model", "single file": tmp_path / "t.safetensors"}
    assert sorted(os.listdir(tmp_path)) == ["model", "t.safetensors"]  # named after the subject
    meta = {"base_model": "tiny", "revision": None, "subject": "t", "steps": 3}
    assert json.loads((tmp_path / "model" / METADATA_FILE).read_text()) == meta
    assert_same_weights(StableDiffusionPipeline.from_pretrained(tmp_path / "model"), tuned)
    written = load_file(tmp_path / "t.safetensors")
    assert torch.equal(written["model.diffusion_model.input_blocks.0.0.weight"], tuned.unet.conv_in.weight.half())
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert {k: f.metadata()[k] for k in meta} == {k: str(v) for k, v in meta.items()}
    # single_file=False: the diffusers folder only.
    only = export_run(tuned, tmp_path / "no_single", {}, single_file=False)
    assert only == {"diffusers": tmp_path / "no_single" / "model"}
    assert os.listdir(tmp_path / "no_single") == ["model"]


@pytest.mark.parametrize("lora", [LoraSettings(rank=2), LoraSettings(text_encoder_rank=2)])
def test_export_run_lora_module_gets_lora_folder_only(tiny_dir, tmp_path, lora):
    m = DreamBoothModule(pretrained="tiny", lora=lora)
    paths = export_run(m, tmp_path, {"subject": "t"})
    folder = tmp_path / "lora"
    assert paths == {"lora (diffusers)": folder / "pytorch_lora_weights.safetensors",
                     "lora (kohya)": folder / "t_lora.safetensors"}
    assert os.listdir(tmp_path) == ["lora"]
    assert sorted(os.listdir(folder)) == ["README.md", "pytorch_lora_weights.safetensors", "t_lora.safetensors"]
    with safe_open(paths["lora (kohya)"], "pt") as f:
        header = f.metadata()
    assert header["modelspec.architecture"] == "dreambooth_pl-custom-32/lora" and header["ss_output_name"] == "t"
    keys = load_file(paths["lora (diffusers)"]).keys()
    assert any(k.startswith("unet.") for k in keys) == bool(lora.rank)
    assert any(k.startswith("text_encoder.") for k in keys) == bool(lora.text_encoder_rank)


@pytest.mark.integration
def test_lora_fit_exports_both_formats_that_change_the_output(tiny_dir, photos, tmp_path):
    m = DreamBoothModule(pretrained="tiny", lora=LoraSettings(rank=4), optim=Optimization(learning_rate=1e-2))
    make_trainer(tmp_path, 3).fit(m, datamodule=make_datamodule(photos))
    paths = export_run(m, tmp_path / "run", {})

    def image(pipe=None, lora: str | None = None):
        if pipe is None:
            pipe = StableDiffusionPipeline.from_pretrained(tiny_dir)
            pipe.set_progress_bar_config(disable=True)
        if lora:
            pipe.load_lora_weights(lora)
        return pipe("a sks can", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base = image()
    diffusers_fmt = image(lora=str(paths["lora (diffusers)"].parent))
    kohya_fmt = image(lora=str(paths["lora (kohya)"]))
    m.eval()
    trained = image(components.pipeline(m.parts()))  # the module's own adapted UNet
    assert np.abs(diffusers_fmt - base).max() > 1e-4
    assert np.abs(diffusers_fmt - trained).max() < 1e-4  # the file carries exactly the trained adapters
    assert np.abs(kohya_fmt - diffusers_fmt).max() < 1e-2  # kohya file is fp16


@pytest.mark.integration
def test_export_command_on_a_mid_run_checkpoint_gives_that_checkpoints_weights(tiny_dir, photos, tmp_path, capsys):
    run = tmp_path / "run"
    saved = ModelCheckpoint(dirpath=run / "checkpoints", save_top_k=-1, every_n_train_steps=2)
    make_trainer(run, 4, [saved], enable_checkpointing=True).fit(
        DreamBoothModule(pretrained="tiny", optim=Optimization(learning_rate=1e-3)), datamodule=make_datamodule(photos))
    mid = next((run / "checkpoints").glob("*step=2.ckpt"))
    cli.main(["export", str(mid)])
    out = run / "exports" / "step000002"
    assert f"Exported diffusers: {out / 'model'}" in capsys.readouterr().out
    ckpt = torch.load(mid, map_location="cpu", weights_only=True)
    pipe = StableDiffusionPipeline.from_pretrained(out / "model")
    unet = pipe.unet.state_dict()
    assert all(torch.equal(unet[k.removeprefix("unet.")], v) for k, v in ckpt["state_dict"].items())
    meta = json.loads((out / "model" / METADATA_FILE).read_text())
    assert meta["steps"] == 2 and meta["instance_prompt"] == "a sks can" and meta["checkpoint"] == str(mid)
    assert (out / "t.safetensors").is_file()
    with pytest.raises(SystemExit):  # a missing checkpoint: one message, exit 1
        cli.main(["export", str(run / "checkpoints" / "nope.ckpt")])
    assert "nope.ckpt does not exist" in capsys.readouterr().err
