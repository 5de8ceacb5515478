"""dreambooth_pl.world_models: every training stage is deterministic on a tiny budget and saves in the diffusers
layout that load_components reads. (The trained world models are not committed yet: their tests come with them.)"""

from __future__ import annotations

import torch

from dreambooth_pl import components
from dreambooth_pl import world_models as wm


def _tiny_stages(seed: int) -> tuple[dict, dict, dict, torch.Tensor]:
    r = wm.tiny_recipe(seed)
    vae, vae_losses = wm.train_vae(r.vae, seed, progress=False)
    tok, te, unet, t2i_losses = wm.train_text2img(vae, r.text2img, seed, progress=False)
    ip2p, ip2p_losses = wm.train_ip2p(vae, tok, te, unet, r.ip2p, seed, progress=False)
    return vae_losses, t2i_losses, ip2p_losses, ip2p.conv_in.weight.detach().clone()


def test_stages_are_deterministic_on_a_tiny_budget():
    first, again, other = _tiny_stages(0), _tiny_stages(0), _tiny_stages(1)
    assert first[:3] == again[:3] and torch.equal(first[3], again[3])
    assert first[0] != other[0]


def test_tiny_world_saves_in_diffusers_layout(tmp_path):
    r = wm.tiny_recipe()
    vae, _ = wm.train_vae(r.vae, progress=False)
    tok, te, unet, _ = wm.train_text2img(vae, r.text2img, progress=False)
    wm.save_sd(tmp_path / "sd", tok, te, vae, unet)
    wm.save_ip2p(tmp_path / "ip2p", tmp_path / "sd", wm.ip2p_unet_from(unet))
    parts = components.load_components(str(tmp_path / "ip2p"))
    assert parts.unet.config.in_channels == 8 and parts.unet.dtype == torch.float32
    assert torch.equal(parts.unet.conv_in.weight[:, :4], unet.conv_in.weight)  # fp16-rounded before saving
    assert wm.weights_bytes(tmp_path) == sum(f.stat().st_size for f in (tmp_path / "sd").rglob("*.safetensors")) + \
        (tmp_path / "ip2p" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
