"""Tests for dreambooth_pl.backbones: SD and SDXL told apart from the model, SDXL's conditioning end to end."""

from __future__ import annotations

import pytest
import torch

from dreambooth_pl import components
from dreambooth_pl.backbones import BACKBONES, Conditioning, backbone_of, time_ids
from dreambooth_pl.components import ModelSource
from dreambooth_pl.data import DreamBoothDataModule
from dreambooth_pl.module import DreamBoothModule, LoraSettings
from dreambooth_pl.single_file import export_single_file

from .conftest import make_datamodule, make_photos


def test_backbone_comes_from_the_loaded_model(tiny_parts, tiny_xl_parts, tiny_dir, tiny_xl_dir):
    assert backbone_of(tiny_parts.unet).name == "sd" and tiny_parts.text_encoder_2 is None
    assert backbone_of(tiny_xl_parts.unet).name == "sdxl"
    assert type(tiny_xl_parts.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    # Without loading weights, from model_index.json: what the data module and the IP2P default use.
    assert components.backbone_of_model(str(tiny_dir)).name == "sd"
    assert components.backbone_of_model(str(tiny_xl_dir)).name == "sdxl"
    assert components.backbone_of_model("some-org/not-cached-anywhere").name == "sd"
    assert BACKBONES["sdxl"].default_ip2p == "diffusers/sdxl-instructpix2pix-768"


def test_sdxl_conditioning_matches_the_diffusers_pipeline(tiny_xl_parts):
    """Hidden states and pooled embedding as StableDiffusionXLPipeline.encode_prompt makes them."""
    p = tiny_xl_parts
    cond = p.backbone.encode([p.tokenizer, p.tokenizer_2], p.text_encoder_modules, ["a sks can", "a can"], "cpu")
    pipe = components.pipeline(p)
    hidden, _, pooled, _ = pipe.encode_prompt(["a sks can", "a can"], device="cpu", do_classifier_free_guidance=False)
    assert cond.hidden.shape == (2, 77, 80) and cond.pooled.shape == (2, 32)
    assert torch.allclose(cond.hidden, hidden, atol=1e-6) and torch.allclose(cond.pooled, pooled, atol=1e-6)
    ids = time_ids(torch.tensor([[80.0, 96]]), torch.tensor([[3.0, 5]]), torch.tensor([[64.0, 64]]))
    expected = pipe._get_add_time_ids((80, 96), (3, 5), (64, 64), torch.float32, text_encoder_projection_dim=32)
    assert torch.equal(ids, expected)


@pytest.fixture
def wide_photos(tmp_path):
    """Landscape photos (so buckets crop and the crop ids are not zero) and class images."""
    return {"instance": make_photos(tmp_path / "i", 2, size=(120, 72), seed=1),
            "class": make_photos(tmp_path / "c", 2, size=(96, 96), seed=2)}


def test_sdxl_training_step_equals_an_independent_computation(tiny_xl_dir, wide_photos):
    """The loss of a bucketed SDXL batch = the MSE of a UNet call built from diffusers' own pieces: the pipeline's
    prompt encoding and add_time_ids from each image's real size and crop, with the same noise and timesteps."""
    m = DreamBoothModule(pretrained="tiny-xl", prior_loss_weight=0.7)
    dm = make_datamodule(wide_photos, batch_size=1, bucket_step=16, center_crop=True)
    dm.model_source = m.source()
    dm.setup("fit")
    assert dm.use_buckets  # on by default for an SDXL model
    batch = next(iter(dm.train_dataloader()))
    ids = batch["time_ids"]  # (2, 6): photo row, class row
    assert batch["pixel_values"].shape[-2:] == (48, 80)  # the 5:3 bucket of a 5:3 photo at 64^2 pixels
    assert ids[0].tolist()[:2] == [72, 120] and ids[0].tolist()[4:] == [48, 80]  # original (H, W), target (h, w)
    # The square class image, resized to 80 x 80 and cropped to the photo's bucket: 16 px off the top.
    assert ids[1].tolist() == [96, 96, 16, 0, 48, 80]
    torch.manual_seed(5)
    loss, parts = m.compute_loss(batch)

    torch.manual_seed(5)  # the same draws by hand: posterior sample, noise, timesteps
    pipe = components.pipeline(components.load_components(str(tiny_xl_dir)))
    with torch.no_grad():
        latents = pipe.vae.encode(batch["pixel_values"]).latent_dist.sample() * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape)
        t = torch.randint(0, 1000, (2,))
        noisy = m.noise_scheduler.add_noise(latents, noise, t)
        hidden, _, pooled, _ = pipe.encode_prompt(batch["prompts"], device="cpu", do_classifier_free_guidance=False)
        add_ids = torch.cat([pipe._get_add_time_ids(tuple(int(v) for v in r[:2]), tuple(int(v) for v in r[2:4]),
                                                    tuple(int(v) for v in r[4:]), torch.float32, 32) for r in ids])
        pred = pipe.unet(noisy, t, encoder_hidden_states=hidden,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": add_ids}).sample
    per_row = (pred - noise).pow(2).flatten(1).mean(1)
    assert parts["instance"].item() == pytest.approx(per_row[0].item(), rel=1e-5)
    assert parts["prior"].item() == pytest.approx(per_row[1].item(), rel=1e-5)
    assert loss.item() == pytest.approx(per_row[0].item() + 0.7 * per_row[1].item(), rel=1e-5)


def test_size_and_crop_ids_reach_the_unet(tiny_xl_dir):
    m = DreamBoothModule(pretrained="tiny-xl").eval()
    latents = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500])
    cond = m.encode_prompts(["a sks can"])
    with torch.no_grad():
        a = m.unet_forward(m.unet, latents, t, cond, torch.tensor([[64.0, 64, 0, 0, 64, 64]]))
        b = m.unet_forward(m.unet, latents, t, cond, torch.tensor([[128.0, 96, 20, 0, 64, 64]]))
    assert not torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="size/crop ids"):
        m.unet_forward(m.unet, latents, t, cond, None)


def test_sdxl_lora_adapts_the_unet_and_both_text_encoders_only(tiny_xl_dir):
    m = DreamBoothModule(pretrained="tiny-xl", lora=LoraSettings(rank=4, text_encoder_rank=2))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for part in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(n.startswith(part) for n in trainable), part
    opt = m.make_optimizer()
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in m.parameters() if p.requires_grad}
    # Full text-encoder training unfreezes both encoders (but the first one's last layer and final norm, which SDXL
    # never reads), and nothing else but the UNet.
    full = DreamBoothModule(pretrained="tiny-xl", train_text_encoder=True)
    parts = full.backbone.unused_text_modules(full.text_encoders)
    assert parts[0] is full.text_encoder.encoder.layers[-1] and parts[1] is full.text_encoder.final_layer_norm
    unused_ids = {id(p) for m in parts for p in m.parameters()}
    frozen = [n for n, p in full.named_parameters() if not p.requires_grad and not n.startswith("vae.")]
    assert frozen and {id(p) for n, p in full.named_parameters() if n in frozen} == unused_ids
    unused = sum(p.numel() for m in parts for p in m.parameters())
    assert sum(p.numel() for p in full.trainable_parameters()) == (
        sum(p.numel() for p in full.unet.parameters()) + sum(p.numel() for p in full.text_encoder.parameters())
        + sum(p.numel() for p in full.text_encoder_2.parameters()) - unused)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_every_trainable_sdxl_parameter_gets_a_gradient(tiny_xl_dir, kind):
    """DDP (find_unused_parameters=False, Lightning's default) fails on a trainable parameter without a gradient:
    with the text encoders training, every trainable weight (or adapter) must be used by the loss."""
    kw = dict(train_text_encoder=True) if kind == "full" else dict(lora=LoraSettings(rank=2, text_encoder_rank=2))
    m = DreamBoothModule(pretrained="tiny-xl", **kw)
    batch = {"pixel_values": torch.rand(2, 3, 64, 64) * 2 - 1, "prompts": ["a sks can", "a can"], "num_instance": 1}
    m.compute_loss(batch)[0].backward()
    unused = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused[:5]


def test_conditioning_rows_and_cat():
    a = Conditioning(torch.randn(2, 77, 8), torch.randn(2, 4))
    b = Conditioning(torch.randn(1, 77, 8), torch.randn(1, 4))
    both = Conditioning.cat([a, b])
    assert both.hidden.shape == (3, 77, 8) and torch.equal(both.rows(slice(2, 3)).pooled, b.pooled)
    assert Conditioning.cat([Conditioning(torch.randn(1, 77, 8))]).pooled is None


def test_single_files_are_told_apart_by_their_keys_or_config(tiny_xl_parts, tiny_parts, tiny_xl_dir, tmp_path):
    xl = export_single_file(tiny_xl_parts, tmp_path / "xl.safetensors")
    sd = export_single_file(tiny_parts, tmp_path / "sd.safetensors")
    assert components.backbone_of_model(str(xl)).name == "sdxl"  # conditioner.embedders.* keys
    assert components.backbone_of_model(str(xl), single_file_config=str(tiny_xl_dir)).name == "sdxl"
    assert components.backbone_of_model(str(sd)).name == "sd"
    # ... and the data module's default for buckets follows (on for SDXL).
    assert DreamBoothDataModule(model=ModelSource(str(xl), single_file_config=str(tiny_xl_dir))).use_buckets
    assert not DreamBoothDataModule(model=ModelSource(str(sd))).use_buckets


# ------------------------------------------------------------------------------------------------ SD3 and Flux


def test_flow_backbones_come_from_the_loaded_transformer(tiny_sd3_dir, tiny_flux_dir):
    for name, folder, denoiser in (("sd3", tiny_sd3_dir, "SD3Transformer2DModel"),
                                   ("flux", tiny_flux_dir, "FluxTransformer2DModel")):
        parts = components.load_components(str(folder))
        assert type(parts.unet).__name__ == denoiser and parts.backbone.name == name
        assert parts.prediction_type == "flow" and type(parts.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
        assert components.backbone_of_model(str(folder)).name == name  # from model_index.json alone
        assert parts.vae.config.latent_channels == 16 and parts.vae.config.shift_factor
    assert BACKBONES["sd3"].text_encoders == ("text_encoder", "text_encoder_2", "text_encoder_3")


def _batch(photos, model: str):
    dm = make_datamodule(photos, batch_size=1, center_crop=True)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_sd3_training_step_equals_diffusers_pieces(tiny_sd3_dir, photos):
    """The loss = the MSE of diffusers' own pieces: the pipeline's prompt encoding (T5 at 77 tokens), latents
    (z - shift) x scale, sigma drawn logit-normally and looked up in the scheduler's table, x_t = (1 - s) x0 + s eps,
    the transformer at the table's timestep, the velocity eps - x0 as the target, weight 1."""
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    m = DreamBoothModule(pretrained="tiny-sd3", prior_loss_weight=0.7)
    batch = _batch(photos, "tiny-sd3")
    torch.manual_seed(5)
    loss, parts = m.compute_loss(batch)

    torch.manual_seed(5)  # the same draws by hand: posterior sample, noise, then u
    pipe = components.pipeline(components.load_components(str(tiny_sd3_dir)))
    sched = pipe.scheduler
    with torch.no_grad():
        z = pipe.vae.encode(batch["pixel_values"]).latent_dist.sample()
        x0 = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        noise = torch.randn(x0.shape)
        u = compute_density_for_timestep_sampling("logit_normal", 2, logit_mean=0.0, logit_std=1.0)
        idx = (u * sched.config.num_train_timesteps).long()
        sigma = sched.sigmas[idx].reshape(-1, 1, 1, 1)
        noisy = (1 - sigma) * x0 + sigma * noise
        hidden, _, pooled, _ = pipe.encode_prompt(batch["prompts"], None, None, device="cpu",
                                                  do_classifier_free_guidance=False, max_sequence_length=77)
        pred = pipe.transformer(hidden_states=noisy, encoder_hidden_states=hidden, pooled_projections=pooled,
                                timestep=sched.timesteps[idx]).sample
        w = compute_loss_weighting_for_sd3("logit_normal", sigma)
    per_row = (w * (pred - (noise - x0)).pow(2)).flatten(1).mean(1)
    assert parts["instance"].item() == pytest.approx(per_row[0].item(), rel=1e-5)
    assert parts["prior"].item() == pytest.approx(per_row[1].item(), rel=1e-5)
    assert loss.item() == pytest.approx(per_row[0].item() + 0.7 * per_row[1].item(), rel=1e-5)


def test_flux_training_step_equals_diffusers_pieces(tiny_flux_dir, photos):
    """Flux: the same by diffusers' pieces: packed 2 x 2 latents with their position ids, uniform sigma, the
    transformer at sigma (it scales by 1000 itself) with the guidance input 3.5, unpacked."""
    from diffusers import FluxPipeline

    m = DreamBoothModule(pretrained="tiny-flux")
    batch = _batch(photos, "tiny-flux")
    torch.manual_seed(6)
    loss, parts = m.compute_loss(batch)

    torch.manual_seed(6)
    pipe = components.pipeline(components.load_components(str(tiny_flux_dir)))
    sched = pipe.scheduler
    with torch.no_grad():
        z = pipe.vae.encode(batch["pixel_values"]).latent_dist.sample()
        x0 = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor  # (2, 16, 8, 8)
        noise = torch.randn(x0.shape)
        idx = (torch.rand(2) * 1000).long()
        t = sched.timesteps[idx]
        sigma = (t / 1000).reshape(-1, 1, 1, 1)  # the unshifted training table (dynamic shifting is for sampling)
        noisy = (1 - sigma) * x0 + sigma * noise
        hidden, pooled, text_ids = pipe.encode_prompt(batch["prompts"], None, device="cpu", max_sequence_length=77)
        packed = FluxPipeline._pack_latents(noisy, 2, 16, 8, 8)
        img_ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
        out = pipe.transformer(hidden_states=packed, encoder_hidden_states=hidden, pooled_projections=pooled,
                               timestep=t / 1000, img_ids=img_ids, txt_ids=text_ids, guidance=torch.full((2,), 3.5)).sample
        pred = FluxPipeline._unpack_latents(out, 64, 64, 8)
    per_row = (pred - (noise - x0)).pow(2).flatten(1).mean(1)
    assert parts["instance"].item() == pytest.approx(per_row[0].item(), rel=1e-5)
    assert parts["prior"].item() == pytest.approx(per_row[1].item(), rel=1e-5)
    assert loss.item() == pytest.approx(per_row[0].item() + per_row[1].item(), rel=1e-5)


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_flow_lora_and_text_training_touch_only_what_they_say(model, tiny_sd3_dir, tiny_flux_dir):
    """LoRA trains only adapters on the backbone's targets; the text encoder trains the CLIPs (never T5), all of
    which then get a gradient, and the optimizer holds exactly the trainable weights."""
    m = DreamBoothModule(pretrained=model, lora=LoraSettings(rank=4))
    targets = m.backbone.lora_targets
    adapted = [n for n, mod in m.unet.named_modules() if hasattr(mod, "lora_A") and any(n.endswith(t) for t in targets)]
    assert adapted and all("lora_" in n for n, p in m.named_parameters() if p.requires_grad)
    assert {id(p) for g in m.make_optimizer().param_groups for p in g["params"]} == {id(p) for p in m.trainable_parameters()}
    full = DreamBoothModule(pretrained=model, train_text_encoder=True)
    t5 = full.text_encoder_3 if model == "tiny-sd3" else full.text_encoder_2
    assert not any(p.requires_grad for p in t5.parameters())
    assert all(any(p.requires_grad for p in e.parameters()) for e in full.trainable_text_encoders)
    batch = {"pixel_values": torch.rand(2, 3, 64, 64) * 2 - 1, "prompts": ["a sks can", "a can"], "num_instance": 1}
    loss, _ = full.compute_loss(batch)
    loss.backward()
    no_grad = [n for n, p in full.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    # SD3's last joint block reads the text as keys and values only: its text queries get a zero gradient.
    assert all("add_q_proj" in n for n in no_grad), no_grad[:5]


def test_flow_options_that_do_not_apply_are_refused_by_name(tiny_sd3_dir):
    with pytest.raises(ValueError, match="model.snr_gamma weights the DDPM loss.*model.flow_weighting"):
        DreamBoothModule(pretrained="tiny-sd3", snr_gamma=5.0)
    with pytest.raises(ValueError, match="model.flow_weighting is for the SD3 / Flux"):
        DreamBoothModule(pretrained="tiny", flow_weighting="cosmap")
