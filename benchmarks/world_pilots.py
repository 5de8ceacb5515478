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

Recipe options (DiffusionRecipe's): --text-aux (attributes read off the pooled text state), --object-weight (the
object's latent cells weigh more), --min-snr (the loss weighting; 1e9 is the plain epsilon loss). --from-scratch trains
the variant with `make world`'s own text-to-image stage instead of continuing (judged after only). --stage ip2p
continues the committed InstructPix2Pix UNet (--no-op: the share of no-op edit triples) and judges it on 300 held-out
renders at --guidance (background and colour edits: pose kept, change right; the no-op: the render back):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/world_pilots.py --from-scratch --variant attn8 --lr 1e-3 --steps 3000
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/world_pilots.py --stage ip2p --steps 2000 --no-op 0.3

--cell 4 --from-scratch is the finer world: an f4 VAE (16x16x4 latents; trained once into --vae-dir and judged on its
round trips), then the text-to-image stage from scratch in the f4 UNet (world_models.unet_architecture(4)):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/world_pilots.py --from-scratch --cell 4 --steps 7000 --lr 1e-3 \
        --threads 2 --save outputs/world/pilot_f4_sd --out outputs/world/pilot_f4.json

The ip2p pilots before 2026-12-07 judged at text / image guidance 5 / 1.5 (`--guidance 5 1.5`); since then 5 / 5.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from dreambooth_pl import components, world
from dreambooth_pl import world_models as wm
from dreambooth_pl.files import atomic_path
from dreambooth_pl.judge import load_judge
from dreambooth_pl.world_claims import (
    ClaimsSettings,
    base_follows_prompts,
    marking_cells,
    read_rates,
    round_trip_reads,
    subject_photo_reads,
)

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


def save(res: dict, out: str) -> None:
    """Print the after-figures and write the pilot's record as JSON."""
    print("after", res["after"], flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=1))


@torch.no_grad()
def ip2p_judged(parts: components.SDComponents, judge, n: int = 300, seed: int = 30_000,
                guidance: tuple[float, float] = (5.0, 5.0)) -> dict:
    """InstructPix2Pix (`parts`) on `n` held-out renders at text / image `guidance` (the claims' 5 / 5), 25 steps:
    one background or colour edit each (pose kept, change right, identity as asked) and the no-op instruction (the
    render back)."""
    rng = np.random.default_rng(seed)
    scenes = [world.random_scene(rng) for _ in range(n)]
    edits = []
    for sc in scenes:
        text, new = world.random_edit(sc, rng)
        while new.size != sc.size or new.position != sc.position:  # background and colour edits only
            text, new = world.random_edit(sc, rng)
        edits.append((text, new))
    photos = [world.render(sc) for sc in scenes] * 2
    prompts = [t for t, _ in edits] + [world.NO_OP] * n
    pipe = components.pipeline(parts, kind="instruct_pix2pix")
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i in range(0, len(prompts), 50):
        images += pipe(prompt=prompts[i : i + 50], image=photos[i : i + 50], num_inference_steps=25, guidance_scale=guidance[0],
                       image_guidance_scale=guidance[1], output_type="pil",
                       generator=[torch.Generator().manual_seed(k) for k in range(i, min(i + 50, len(prompts)))]).images
    reads = judge.read(images)
    edit, no_op = reads[:n], reads[n:]
    pairs = list(zip(edit, scenes, edits, strict=True))
    return {"pose_kept": float(np.mean([r["size"] == sc.size and r["position"] == sc.position for r, sc, _ in pairs])),
            "change_right": float(np.mean([r["background"] == new.background and r["color"] == new.color
                                           for r, _, (_, new) in pairs])),
            "identity_as_asked": float(np.mean([all(r[a] == getattr(new, a) for a in world.IDENTITY)
                                                for r, _, (_, new) in pairs])),
            "no_op": float(np.mean([all(r[a] == getattr(sc, a) for a in world.ATTRIBUTES)
                                    for r, sc in zip(no_op, scenes, strict=True)])),
            "no_op_per_attribute": {a: float(np.mean([r[a] == getattr(sc, a) for r, sc in zip(no_op, scenes, strict=True)]))
                                    for a in world.ATTRIBUTES}}


def ip2p_pilot(judge, a: argparse.Namespace, start: float) -> None:
    """Continue the committed InstructPix2Pix UNet for `a.steps` steps of `make world`'s stage on fresh edits."""
    ip2p = components.load_components("world-ip2p")
    ip2p = dataclasses.replace(ip2p, vae=ip2p.vae.float(), text_encoder=ip2p.text_encoder.float(),
                               unet=ip2p.unet.float().eval())
    guidance = tuple(a.guidance)
    res = {"stage": "ip2p", "steps": a.steps, "lr": a.lr, "no_op_share": a.no_op, "min_snr_gamma": a.min_snr,
           "guidance": guidance, "before": ip2p_judged(ip2p, judge, guidance=guidance)}
    print("before", res["before"], flush=True)
    recipe = dataclasses.replace(wm.WorldRecipe().ip2p, steps=a.steps, lr=a.lr, min_snr_gamma=a.min_snr, no_op=a.no_op)
    unet, losses = wm.train_ip2p(ip2p.vae, ip2p.tokenizer, ip2p.text_encoder, None, recipe, seed=7, init=ip2p.unet)
    res.update(loss=losses["loss"], after=ip2p_judged(dataclasses.replace(ip2p, unet=unet), judge, guidance=guidance),
               minutes=(time.perf_counter() - start) / 60)
    save(res, a.out)


def continuation_recipe(a: argparse.Namespace) -> wm.DiffusionRecipe:
    """`make world`'s text-to-image stage, `a.steps` more steps from `a.lr` with a short warm-up (it starts trained)."""
    return dataclasses.replace(wm.WorldRecipe().text2img, steps=a.steps, lr=a.lr, warmup=100, text_aux_weight=a.text_aux,
                               object_weight=a.object_weight, min_snr_gamma=a.min_snr)


def vae_judged(vae, judge) -> dict:
    """The judge on VAE round trips of 1,000 held-out renders (per attribute, marking x size) and of every world
    subject's photos: what any image the VAE decodes can show."""
    scenes, reads = round_trip_reads(judge, vae)
    subjects = [*world.SUBJECTS, *world.VALIDATION_SUBJECTS]
    return {"per_attribute": read_rates(reads, scenes), "marking_cells": marking_cells(reads, scenes),
            "subject_photos": subject_photo_reads(judge, vae, subjects, world_data_root())}


def world_data_root() -> Path:
    """The world subjects' photos (make world-data), written here first when missing."""
    root = Path("data/world")
    if not (root / "dataset").is_dir():
        world.write_dataset(root)
    return root


def f4_vae(a: argparse.Namespace, judge) -> tuple[AutoencoderKL, dict | None]:
    """`make world`'s VAE stage at `a.cell` px per latent cell, trained once into `a.vae_dir` (then loaded) and judged
    on its round trips when trained."""
    folder = Path(a.vae_dir)
    if (folder / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval()
        if list(vae.config.block_out_channels) != list(wm.vae_architecture(a.cell)["block_out_channels"]):
            raise SystemExit(f"world_pilots: {folder} holds a VAE of another latent cell than --cell {a.cell}; "
                             f"give another --vae-dir")
        return vae, None
    t = time.perf_counter()
    vae, losses = wm.train_vae(dataclasses.replace(wm.VAERecipe(), cell=a.cell), seed=0)
    with atomic_path(folder, folder=True) as tmp:
        wm.save_fp16(vae, tmp)
    res = {"cell": a.cell, "losses": losses, "minutes": (time.perf_counter() - t) / 60, "judged": vae_judged(vae, judge)}
    print("vae", json.dumps(res["judged"]["per_attribute"]), flush=True)
    return vae, res


def scratch(parts: components.SDComponents, judge, a: argparse.Namespace, start: float) -> None:
    """`make world`'s text-to-image stage from scratch, `a.steps` steps, in the variant's UNet over the committed
    VAE, or with --cell 4 over an f4 VAE (trained first) in the f4 UNet; with --save, the model in diffusers layout."""
    recipe = dataclasses.replace(wm.WorldRecipe().text2img, steps=a.steps, lr=a.lr, text_aux_weight=a.text_aux,
                                 object_weight=a.object_weight, min_snr_gamma=a.min_snr)
    vae, vae_res = (parts.vae.float(), None) if a.cell == 8 else f4_vae(a, judge)
    t = time.perf_counter()
    tok, te, unet, losses = wm.train_text2img(vae, recipe, seed=0,
                                              unet_config={**wm.unet_architecture(a.cell), **VARIANTS[a.variant]})
    text2img_minutes = (time.perf_counter() - t) / 60
    if a.save:
        wm.save_sd(a.save, tok, te, vae, unet)
    parts = dataclasses.replace(parts, vae=vae, text_encoder=te, unet=unet)
    res = {"variant": a.variant, "from_scratch": True, "cell": a.cell, "steps": a.steps, "lr": a.lr,
           "min_snr_gamma": a.min_snr, "text_aux": a.text_aux, "object_weight": a.object_weight, "vae": vae_res,
           "loss": losses["loss"], "text2img_minutes": text2img_minutes, "after": judged(parts, judge),
           "minutes": (time.perf_counter() - start) / 60}
    save(res, a.out)


TEXT2IMG_ONLY = {"variant": "plain", "text_aux": 0.0, "object_weight": 0.0, "from_scratch": False,  # option: default
                 "cell": 8, "save": None}
IP2P_ONLY = {"no_op": None, "guidance": (5.0, 5.0)}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, the stage recipe's values filled in where not given; one error for an option the stage ignores."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=list(VARIANTS), default="plain")
    p.add_argument("--steps", type=int, default=4000, help="more training steps")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (the build's is 1e-3)")
    p.add_argument("--text-aux", type=float, default=0.0,
                   help="text_aux_weight: + this x the attributes read off the pooled text state (fresh heads)")
    p.add_argument("--object-weight", type=float, default=0.0,
                   help="object_weight: a latent cell's loss weighs 1 + this x the share of it the object covers")
    p.add_argument("--stage", choices=["text2img", "ip2p"], default="text2img",
                   help="ip2p: continue the committed InstructPix2Pix UNet instead (pose kept, no-op on held-out renders)")
    p.add_argument("--min-snr", type=float, default=None,
                   help="min_snr_gamma: eps loss x min(SNR, this) / SNR (default: make world's stage recipe); 1e9 is "
                        "the plain eps loss, which weighs the low-noise steps (where fine detail is drawn) fully")
    p.add_argument("--no-op", type=float, default=None,
                   help="ip2p: share of edit triples that are the no-op instruction (default: make world's recipe)")
    p.add_argument("--guidance", type=float, nargs=2, default=(5.0, 5.0), metavar=("TEXT", "IMAGE"),
                   help="ip2p: text and image guidance of the judged edits (the claims' 5 5)")
    p.add_argument("--from-scratch", action="store_true",
                   help="train a fresh text encoder and UNet (the variant's) with make world's own stage, not continue")
    p.add_argument("--cell", type=int, choices=[8, 4], default=8,
                   help="px per latent cell; 4 (with --from-scratch) trains an f4 VAE into --vae-dir first, then the "
                        "f4 text-to-image model (16x16 latents) over it")
    p.add_argument("--vae-dir", default="outputs/world/pilot_vae_f4",
                   help="--cell 4: the f4 VAE's folder (trained there once, loaded after)")
    p.add_argument("--save", default=None, help="--from-scratch: write the trained model here (diffusers layout)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="outputs/world/pilot.json", help="the figures, as JSON")
    a = p.parse_args(argv)
    a.guidance = tuple(a.guidance)
    ignored = IP2P_ONLY if a.stage == "text2img" else TEXT2IMG_ONLY
    given = [k for k, default in ignored.items() if getattr(a, k) != default]
    if given:
        p.error(f"--{given[0].replace('_', '-')} does not apply to --stage {a.stage}: drop it, or choose the other stage")
    if (a.cell != 8 or a.save) and not a.from_scratch:
        p.error("--cell 4 and --save train a new text-to-image model: add --from-scratch")
    if a.cell != 8 and a.variant != "plain":
        p.error(f"--variant {a.variant} grafts onto the f8 UNet; --cell 4 has its own (world_models.unet_architecture)")
    stage = wm.WorldRecipe().ip2p if a.stage == "ip2p" else wm.WorldRecipe().text2img
    # the stage recipe's values where not given, so the JSON records what each pilot ran with
    a.min_snr = stage.min_snr_gamma if a.min_snr is None else a.min_snr
    a.no_op = stage.no_op if a.no_op is None else a.no_op
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    start = time.perf_counter()
    if a.stage == "ip2p":
        ip2p_pilot(load_judge(), a, start)
        return
    parts, judge = components.load_components("world"), load_judge()
    if a.from_scratch:
        scratch(parts, judge, a, start)
        return
    parts = dataclasses.replace(parts, unet=grafted(parts.unet.float(), a.variant).eval())
    res = {"variant": a.variant, "steps": a.steps, "lr": a.lr, "min_snr_gamma": a.min_snr, "text_aux": a.text_aux,
           "object_weight": a.object_weight, "before": judged(parts, judge)}
    print("before", res["before"], flush=True)
    recipe = continuation_recipe(a)
    # seed 7: fresh scenes and noise, not the build's (seed 0); both models are trained in place, so `parts` has them
    _, te, unet, losses = wm.train_text2img(parts.vae.float(), recipe, seed=7,
                                            init=(parts.text_encoder.float(), parts.unet))
    res.update(loss=losses["loss"], after=judged(parts, judge), minutes=(time.perf_counter() - start) / 60)
    save(res, a.out)


if __name__ == "__main__":
    main()
