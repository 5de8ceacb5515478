"""The DreamBench evaluation protocol: prompts, seeded sampling, and scoring (DINO, CLIP-I, CLIP-T, PRES, DIV)."""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from . import components
from .components import Sampler
from .data import benchmark_prompts
from .metrics import MeanValue, PairwiseCosine, within_group_pairs

# DreamBooth paper, Table 1 (mean over the 30 DreamBench subjects).
PAPER_ROWS = {
    "Real images (paper)": {"dino": 0.774, "clip_i": 0.885},
    "Stable Diffusion, DreamBooth (paper)": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
}
METRIC_KEYS = ("dino", "clip_i", "clip_t", "clip_t_no_token", "pres", "div")
# Scores that only some encoders give (the toy world's judge): metric key -> its encoder role in `load_encoders`.
OPTIONAL_KEYS = {"dino_identity": "dino_identity", "clip_i_identity": "clip_identity"}
FILE_RE = re.compile(r"^(\d+)_(\d+)\.png$")  # samples/<stage>/<prompt index>_<seed>.png


@dataclass(frozen=True)
class Protocol:
    """How images are made for scoring (the `eval.protocol:` group); stored with every metrics.json.

    Args:
        images_per_prompt: images per benchmark prompt (the paper: 4 per prompt, 25 prompts)
        seed: image k of every prompt uses seed + k, PRES image j seed + j; kept apart from the class images' seeds
            (data.prior.seed + i), so the fine-tuned model is never scored on the noise it was prior-trained on
        steps: sampling steps
        guidance_scale: classifier-free guidance scale
        sampler: sampling scheduler (`default` = the model's own)
        resolution: image size in px; null = the data's resolution
        pres_images: images of the plain class prompt for PRES; null = images_per_prompt x prompts (4 x 25)
    """

    images_per_prompt: int = 4
    seed: int = 10_000
    steps: int = 25
    guidance_scale: float = 7.5
    sampler: Sampler = "dpm++"
    resolution: int | None = None
    pres_images: int | None = None


@dataclass
class EvalPrompt:
    """One benchmark prompt: with the identifier (for sampling and CLIP-T) and without it."""

    index: int
    prompt: str
    prompt_no_token: str
    template: str = ""


def check_seeds_apart(protocol: Protocol, n_images: int, prior_seed: int, num_class_images: int) -> None:
    """Refuse evaluation seeds that overlap the class images' seeds: PRES would ask for the prior-trained images."""
    eval_seeds = range(protocol.seed, protocol.seed + n_images)
    class_seeds = range(prior_seed, prior_seed + num_class_images)
    if eval_seeds.start < class_seeds.stop and class_seeds.start < eval_seeds.stop:
        raise ValueError(
            f"eval.protocol.seed={protocol.seed} gives evaluation seeds {eval_seeds.start}..{eval_seeds.stop - 1}, which "
            f"overlap the class images' seeds {class_seeds.start}..{class_seeds.stop - 1} (data.prior.seed): the PRES "
            f"images would be the ones the model was prior-trained on; move eval.protocol.seed past "
            f"{class_seeds.stop - 1} (the default is {Protocol.seed})")


def protocol_prompts(prompts_dir: str | Path, subject_type: str, identifier: str, class_noun: str) -> list[EvalPrompt]:
    """The 25 DreamBench prompts of the subject's type ({0} identifier, {1} class noun)."""
    f = Path(prompts_dir) / f"prompts_{subject_type}.txt"
    with_token = benchmark_prompts(f, identifier, class_noun)
    no_token = benchmark_prompts(f, "", class_noun)
    templates = [t.strip() for t in f.read_text(encoding="utf-8").splitlines() if t.strip()]
    return [EvalPrompt(i, a, b, t) for i, (a, b, t) in enumerate(zip(with_token, no_token, templates, strict=True))]


@torch.inference_mode()
def sample(parts: components.SDComponents, prompts: list[str], seeds: list[int], protocol: Protocol,
           batch_size: int = 8) -> list[Image.Image]:
    """One image per (prompt, seed) pair, each from its own CPU generator (same noise on any device)."""
    pipe = components.pipeline(parts, sampler=protocol.sampler)
    out: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        p, s = prompts[start : start + batch_size], seeds[start : start + batch_size]
        with mixed_precision(parts):
            out += pipe(prompt=p, num_inference_steps=protocol.steps, guidance_scale=protocol.guidance_scale,
                        height=protocol.resolution, width=protocol.resolution,
                        generator=[torch.Generator("cpu").manual_seed(x) for x in s], output_type="pil",
                        **parts.backbone.sample_kwargs).images
    return out


def mixed_precision(parts: components.SDComponents):
    """Autocast to the half precision of the frozen parts when it differs from the UNet's (the memory presets keep
    the VAE and text encoder in bf16 and the trained UNet in fp32); a no-op when all parts share one dtype."""
    dtypes = {m.dtype for m in (*parts.text_encoder_modules, parts.vae, parts.unet) if m is not None}
    if len(dtypes) == 1:
        return nullcontext()
    return torch.autocast(parts.unet.device.type, dtype=next(d for d in dtypes if d != torch.float32))


@dataclass
class Scored:
    """Scores of one stage: means per metric, per-prompt means and per-image rows."""

    metrics: dict[str, float]
    per_prompt: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)


def _new_metrics(keys) -> dict:
    """A sum-and-count metric per key: pairwise cosine for subject fidelity, a mean for CLIP-T (of `text_image_scores`)
    and DIV. `score` is given every image (rank zero scores after the ranks sampled their shares), so the metrics
    never sync over a process group: a sync there would wait for ranks that are not scoring."""
    return {k: (PairwiseCosine if k in ("dino", "clip_i", "pres", *OPTIONAL_KEYS) else MeanValue)(sync_on_compute=False)
            for k in keys}


def text_image_scores(clip, texts: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(N,) CLIP-T of aligned (prompt, image) embedding rows: the encoder's own score when it has one (the world
    judge: the share of the named attributes right), else their cosine."""
    own = getattr(clip, "text_image_scores", None)
    if own is not None:
        return own(texts.double(), images.double())
    unit = lambda x: torch.nn.functional.normalize(x.double(), dim=-1)  # noqa: E731
    return (unit(texts) * unit(images)).sum(-1)


def reference_rows(encoders: dict) -> dict[str, dict[str, float]]:
    """The paper's Table 1 rows, shown beside scores on their scale (DINO / CLIP encoders); none beside the toy world's
    judge, whose scores mean something else."""
    return {} if any(str(getattr(e, "name", "")).startswith("world judge") for e in encoders.values()) else PAPER_ROWS


def _image_rows(ep: EvalPrompt, seeds: list[int], dino_real, clip_real, d, c, clip_t) -> list[dict]:
    """Per-image scores of one prompt: mean cosine to the real photos, CLIP-T (k,) to the prompt."""
    unit = lambda x: torch.nn.functional.normalize(x.double(), dim=-1)  # noqa: E731
    dr, cr, dn, cn = unit(dino_real), unit(clip_real), unit(d), unit(c)
    return [{"prompt_index": ep.index, "prompt": ep.prompt, "seed": seed, "dino": float((dr @ dn[j]).mean()),
             "clip_i": float((cr @ cn[j]).mean()), "clip_t": float(clip_t[j])} for j, seed in enumerate(seeds)]


@torch.inference_mode()
def score(encoders: dict, real: list[Image.Image], groups: list[tuple[EvalPrompt, list[int], list[Image.Image]]],
          class_images: list[Image.Image] | None = None) -> Scored:
    """DINO / CLIP-I / CLIP-T (with and without the identifier) / DIV over prompt groups, PRES over class images."""
    optional = {k: encoders[role] for k, role in OPTIONAL_KEYS.items() if role in encoders}  # the world's identity
    dino_real = encoders["dino"].encode_images(real)  # (R, Dd)
    clip_real = encoders["clip"].encode_images(real)  # (R, Dc)
    real_of = {k: enc.encode_images(real) for k, enc in optional.items()}
    m = _new_metrics((*METRIC_KEYS, *optional))
    per_prompt, rows = [], []
    for ep, seeds, images in groups:
        d = encoders["dino"].encode_images(images)  # (k, Dd)
        c = encoders["clip"].encode_images(images)  # (k, Dc)
        t = encoders["clip"].encode_texts([ep.prompt, ep.prompt_no_token])  # (2, Dc)
        clip_t = text_image_scores(encoders["clip"], t[:1].expand_as(c), c)  # (k,)
        clip_t_no_token = text_image_scores(encoders["clip"], t[1:].expand_as(c), c)
        # Fresh per-prompt metrics for the table; the stage metrics accumulate sums and counts.
        p = _new_metrics(("dino", "clip_i", "clip_t", "clip_t_no_token", "div", *optional))
        for mm in (m, p):
            mm["dino"].update(dino_real, d)
            mm["clip_i"].update(clip_real, c)
            mm["clip_t"].update(clip_t[~clip_t.isnan()])  # a prompt naming nothing the encoder reads: no score
            mm["clip_t_no_token"].update(clip_t_no_token[~clip_t_no_token.isnan()])
        for k, enc in optional.items():
            g = enc.encode_images(images)
            for mm in (m, p):
                mm[k].update(real_of[k], g)
        pairs = within_group_pairs(len(images))
        if pairs:
            dist = encoders["lpips"].distances([images[i] for i, _ in pairs], [images[j] for _, j in pairs])
            m["div"].update(dist)
            p["div"].update(dist)
        per_prompt.append({"index": ep.index, "prompt": ep.prompt,
                           **{k: float(v.compute()) for k, v in p.items() if k != "div" or pairs}})
        rows += _image_rows(ep, seeds, dino_real, clip_real, d, c, clip_t)
    if class_images:
        m["pres"].update(dino_real, encoders["dino"].encode_images(class_images))
    # PRES needs class images and DIV pairs of images of one prompt: no score (and no empty compute) without them.
    skip = {"pres"} if not class_images else set()
    skip |= {"div"} if not any(len(within_group_pairs(len(ims))) for _, _, ims in groups) else set()
    metrics = {k: float(v.compute()) for k, v in m.items() if k not in skip}
    return Scored(metrics=metrics, per_prompt=per_prompt, rows=rows)


def real_vs_real(encoders: dict, real: list[Image.Image]) -> dict[str, float]:
    """The paper's 'real images' reference: all pairs of distinct photos of the subject."""
    out = {}
    for key, enc in (("dino", encoders["dino"]), ("clip_i", encoders["clip"])):
        e = enc.encode_images(real)
        metric = PairwiseCosine()
        metric.update(e, e, exclude_self=len(real) > 1)
        out[key] = float(metric.compute())
    return out


def encoder_info(encoders: dict) -> dict:
    """The encoders' names and whether every one of them is calibrated (real weights), for metrics.json."""
    return {"encoders": {k: getattr(v, "name", k) for k, v in encoders.items()},
            "calibrated": bool(encoders) and all(getattr(v, "calibrated", False) for v in encoders.values())}
