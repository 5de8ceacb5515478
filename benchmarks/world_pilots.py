"""Text-to-image pilots for the toy world's next retraining: is the committed sd/ model short of steps, of text
conditioning, or of text at the 8x8 level? Each pilot continues the committed UNet and text encoder for `--steps`
more steps on fresh captioned renders (warm-up + cosine from `--lr`, EMA, as `make world`'s stage), optionally with
new layers grafted on and zero-initialised (so the start is exactly the committed model), and judges the base model
on the same 200 held-out full prompts before and after (world_claims.base_follows_prompts).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/world_pilots.py --variant plain --out outputs/world/pilot_plain.json

Variants:
    plain: the committed architecture (does more training help?)
    text:  + a pooled text embedding added to the time embedding (`addition_embed_type="text"`, +7.7k params)
    attn8: + cross-attention at 8x8 too (+150k params, about 2x the step time)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from dreambooth_pl import components, world
from dreambooth_pl import world_models as wm
from dreambooth_pl.judge import load_judge
from dreambooth_pl.world_claims import ClaimsSettings, base_follows_prompts

VARIANTS = {
    "plain": {},
    "text": {"addition_embed_type": "text", "addition_embed_type_num_heads": 4},
    "attn8": {"down_block_types": ("CrossAttnDownBlock2D",) * 2, "up_block_types": ("CrossAttnUpBlock2D",) * 2},
}
NEW_ATTENTIONS = ("down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1")  # attn8's


def grafted(unet: UNet2DConditionModel, variant: str) -> UNet2DConditionModel:
    """The committed UNet in the variant's architecture, its new layers' outputs zero (the same function at start)."""
    new = UNet2DConditionModel(**{**wm.UNET_CONFIG, **VARIANTS[variant]})
    _, unexpected = new.load_state_dict(unet.state_dict(), strict=False)
    assert not unexpected, unexpected
    with torch.no_grad():
        if variant == "text":  # its last LayerNorm's affine at 0: adds nothing to the time embedding
            new.add_embedding.norm2.weight.zero_()
            new.add_embedding.norm2.bias.zero_()
        elif variant == "attn8":  # each new transformer's output projection at 0: a pure residual
            for name in NEW_ATTENTIONS:
                proj = new.get_submodule(name).proj_out
                proj.weight.zero_()
                proj.bias.zero_()
    return new


def judged(parts: components.SDComponents, judge) -> dict:
    """Every attribute right on 200 held-out full prompts, per attribute, body colours of "a <shape>"."""
    r = base_follows_prompts(parts, judge, ClaimsSettings())
    return {"all_right": r["all_right"], "per_attribute": r["per_attribute"],
            "colours": {k: len(v) for k, v in r["colours"].items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=list(VARIANTS), default="plain")
    p.add_argument("--steps", type=int, default=4000, help="more training steps")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (the build's is 1e-3)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="outputs/world/pilot.json", help="the figures, as JSON")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    start = time.perf_counter()
    parts, judge = components.load_components("world"), load_judge()
    parts = dataclasses.replace(parts, unet=grafted(parts.unet.float(), a.variant).eval())
    res = {"variant": a.variant, "steps": a.steps, "lr": a.lr, "before": judged(parts, judge)}
    print("before", res["before"], flush=True)
    vae, te, unet = parts.vae.float(), parts.text_encoder.float(), parts.unet
    te.train().requires_grad_(True)
    unet.train().requires_grad_(True)
    recipe = wm.DiffusionRecipe(steps=a.steps, lr=a.lr, warmup=100)
    rng, gen = np.random.default_rng([7, 2]), torch.Generator().manual_seed(9)  # fresh scenes, not the build's seeds
    scenes = [world.random_scene(rng) for _ in range(recipe.examples)]
    mean, std = wm.encode(vae, scenes)  # (N, 4, 8, 8) each
    sched = DDPMScheduler.from_config(wm.SCHEDULER_CONFIG)

    def step_loss() -> torch.Tensor:
        idx = torch.from_numpy(rng.integers(0, len(scenes), recipe.batch_size))
        captions = [wm.caption_for(scenes[i], rng, recipe) for i in idx.tolist()]
        z0 = wm.draw_latents(mean[idx], std[idx], vae.config.scaling_factor, gen)
        states = te(wm.token_ids(parts.tokenizer, captions))[0]  # (B, 32, 32)
        return wm.diffusion_loss(unet, sched, z0, states, gen, recipe.min_snr_gamma)

    groups = [{"params": list(unet.parameters()), "lr": a.lr, "weight_decay": recipe.weight_decay},
              {"params": list(te.parameters()), "lr": a.lr, "weight_decay": 0.0}]
    curve = wm.fit(groups, step_loss, a.steps, recipe.warmup, recipe.ema_decay, f"pilot {a.variant}")
    te.eval()
    unet.eval()
    wm.round_fp16(te, unet)
    res.update(loss=wm.tail_mean(curve), after=judged(parts, judge), minutes=(time.perf_counter() - start) / 60)
    print("after", res["after"], flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
