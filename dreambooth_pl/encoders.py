"""Evaluation encoders: DINO and CLIP embeddings and LPIPS distances, pretrained (`real`), random (`tiny`) or the
toy world's judge in those roles (`world`).

Encoders only turn images and texts into unit embeddings (or image pairs into distances); averaging
them into scores is `dreambooth_pl.metrics`' job.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import open_clip
import timm
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

# The `real` LPIPS is torchmetrics' public metric. Its private network class serves only the offline `tiny` kind:
# the public metric always loads the ImageNet AlexNet, and `tiny` needs the same network on a random backbone.
from torchmetrics.functional.image.lpips import _NoTrainLpips
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
from torchvision import transforms as T
from torchvision.models import AlexNet_Weights

from .judge import Judge, JudgeLoadError, load_judge, parse_prompt, to_pixels
from .world import IDENTITY

KINDS = ("real", "tiny", "world")
DINO_MODEL = "vit_small_patch16_224.dino"  # timm: ViT-S/16 trained with DINO (Caron et al. 2021)
CLIP_MODEL, CLIP_PRETRAINED = "ViT-B-32", "openai"  # open_clip: CLIP ViT-B/32 with OpenAI's weights
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_SEED = 0
TINY_DIM = 64
LPIPS_SIZE = 256


class EncoderLoadError(RuntimeError):
    """An evaluation backbone could not be loaded; the message says which and what to do."""


# ---------------------------------------------------------------------------------------------
# Helpers


def _rgb(images: Sequence[Image.Image], what: str = "images") -> list[Image.Image]:
    if isinstance(images, Image.Image):
        raise TypeError(f"{what} must be a list of PIL images, got a single image: wrap it as [image]")
    out = []
    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise TypeError(f"{what}[{i}] is a {type(im).__name__}, not a PIL image: convert arrays with "
                            f"PIL.Image.fromarray (uint8, HxWx3)")
        out.append(im if im.mode == "RGB" else im.convert("RGB"))
    return out


def _first_param(module: nn.Module) -> Tensor:
    return next(module.parameters())


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # Fixed weights for the tiny encoders without disturbing the caller's CPU random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown encoder kind {kind!r}: choose 'real' (pretrained weights, needs them "
                         f"downloaded once), 'tiny' (random, offline, uncalibrated) or 'world' (the toy world's "
                         f"judge, committed weights, for images of the world)")


def _hub_offline() -> bool:
    # Read at call time (not import time) so HF_HUB_OFFLINE set by the CLI or tests is honoured.
    return bool(getattr(hub_constants, "HF_HUB_OFFLINE", False))


def _hf_cached(repo_id: str, filenames: Sequence[str], cache_dir: str | Path | None) -> bool:
    return any(isinstance(try_to_load_from_cache(repo_id, f, cache_dir=cache_dir), str) for f in filenames)


def _unavailable(backbone: str, reason: str) -> EncoderLoadError:
    # One sentence; the underlying exception stays chained as __cause__ for the details.
    return EncoderLoadError(
        f"Cannot load the {backbone}: {reason}; its pretrained weights need network access once (they are "
        f"cached after) or a local cache holding them, and kind='tiny' (EVAL=tiny) runs offline but uncalibrated."
    )


# ---------------------------------------------------------------------------------------------
# Encoders


class _EvalOnly(nn.Module):
    """A module that stays in eval mode (no dropout, drop-path) whatever `.train()` asks."""

    def train(self, mode: bool = True) -> _EvalOnly:
        # A LightningModule holding an encoder calls .train() on all its children every epoch.
        return super().train(False)


def dino_transform() -> T.Compose:
    """DINO evaluation preprocessing: resize 256 (bicubic, shorter side), center crop 224, ImageNet normalisation."""
    return T.Compose([
        T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(224),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class DinoEncoder(_EvalOnly):
    """A timm ViT as an image embedder: the last layer's CLS token after the final norm, L2-normalised."""

    def __init__(self, model: nn.Module, *, name: str, calibrated: bool) -> None:
        super().__init__()
        if getattr(model, "cls_token", None) is None:
            raise ValueError(f"DinoEncoder needs a ViT with a CLS token, got {type(model).__name__} without one")
        self.model = model.eval().requires_grad_(False)
        self.transform = dino_transform()
        self.name = name
        self.calibrated = calibrated
        self.dim: int = model.num_features

    def forward(self, pixels: Tensor) -> Tensor:
        """(B, 3, 224, 224) normalised pixels -> (B, D) float32 unit vectors."""
        tokens = self.model.forward_features(pixels)  # (B, 1 + patches, D), after the final norm
        return F.normalize(tokens[:, 0].float(), dim=-1)

    def encode_images(self, images: Sequence[Image.Image], *, batch_size: int = 32) -> Tensor:
        """(N, D) float32 unit embeddings on the module's device."""
        return _encode_batches(self, images, self.transform, self, batch_size)


def _encode_batches(enc: nn.Module, images: Sequence[Image.Image], transform, embed, batch_size: int) -> Tensor:
    """Transform and embed images in batches on the encoder's device: (N, D) float32."""
    _check_batch_size(batch_size)
    images = _rgb(images)
    p = _first_param(enc)
    out = [torch.empty(0, enc.dim, device=p.device)]
    for i in range(0, len(images), batch_size):
        pixels = torch.stack([transform(im) for im in images[i : i + batch_size]])
        with torch.inference_mode():
            out.append(embed(pixels.to(p.device, p.dtype)))
    return torch.cat(out)  # outside inference mode: an ordinary tensor callers may use with autograd


def clip_preprocess() -> T.Compose:
    """open_clip's inference preprocessing for ViT-B-32/openai, built from its pretrained config (no download)."""
    cfg = open_clip.get_pretrained_cfg(CLIP_MODEL, CLIP_PRETRAINED)
    return open_clip.image_transform(
        224, is_train=False, mean=cfg["mean"], std=cfg["std"],
        interpolation=cfg["interpolation"], resize_mode=cfg["resize_mode"],
    )


class ClipEncoder(_EvalOnly):
    """An open_clip model with its own preprocessing and tokenizer: images and texts to unit embeddings."""

    def __init__(self, model: nn.Module, preprocess: Any, tokenizer: Any, *, name: str, calibrated: bool) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name
        self.calibrated = calibrated
        self.dim: int = model.visual.output_dim

    def encode_images(self, images: Sequence[Image.Image], *, batch_size: int = 32) -> Tensor:
        """(N, D) float32 unit image embeddings on the module's device."""
        return _encode_batches(self, images, self.preprocess,
                               lambda x: self.model.encode_image(x, normalize=True).float(), batch_size)

    def encode_texts(self, texts: Sequence[str], *, batch_size: int = 256) -> Tensor:
        """(N, D) float32 unit text embeddings on the module's device."""
        _check_batch_size(batch_size)
        if isinstance(texts, str):
            raise TypeError(f"texts must be a list of strings, got the string {texts!r}: wrap it as [prompt]")
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts must be a list of strings, got {[type(t).__name__ for t in texts]}")
        p = _first_param(self)
        out = [torch.empty(0, self.dim, device=p.device)]
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[i : i + batch_size]))  # (B, 77) ids: 49406 ... 49407, 0-padded
            with torch.inference_mode():
                out.append(self.model.encode_text(tokens.to(p.device), normalize=True).float())
        return torch.cat(out)


class PublicLpips(nn.Module):
    """torchmetrics' public LPIPS metric as a pairwise function: (B, 3, H, W) twice in [-1, 1] -> (B,) distances."""

    def __init__(self, metric: LearnedPerceptualImagePatchSimilarity) -> None:
        super().__init__()
        self.metric = metric

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        d = self.metric(x, y)  # reduction "none": this batch's scores
        self.metric.reset()  # keep no state between batches
        return d


class LpipsDistance(_EvalOnly):
    """LPIPS (AlexNet) distance between image pairs; 0 for identical images, higher = more different.

    Every image is resized (bicubic, shorter side) to `size` and center-cropped to size x size, so
    images of different sizes or aspect ratios are compared on the same grid, then scaled to [-1, 1].
    """

    def __init__(self, net: nn.Module, *, name: str, calibrated: bool, size: int = LPIPS_SIZE) -> None:
        super().__init__()
        if size < 32:
            raise ValueError(f"LPIPS size must be >= 32 pixels (smaller images vanish in AlexNet's strided layers), got {size}")
        self.net = net.eval().requires_grad_(False)
        self.size = size
        self.transform = T.Compose([
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # [0, 1] -> [-1, 1], the range LPIPS expects
        ])
        self.name = name
        self.calibrated = calibrated

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """(B, 3, H, W) pixels in [-1, 1] twice -> (B,) float32 distances."""
        return self.net(x, y).reshape(-1).float()  # net gives (B, 1, 1, 1)

    def distances(self, a: Sequence[Image.Image], b: Sequence[Image.Image], *, batch_size: int = 16) -> Tensor:
        """(N,) float32 distances of the pairs (a[i], b[i]) on the module's device."""
        _check_batch_size(batch_size)
        a, b = _rgb(a, "a"), _rgb(b, "b")
        if len(a) != len(b):
            raise ValueError(f"LPIPS scores pairs (a[i], b[i]): got {len(a)} and {len(b)} images; pass equal-length "
                             f"lists (use metrics.within_group_pairs to form the pairs of one group)")
        p = _first_param(self)
        out = [torch.empty(0, device=p.device)]
        for i in range(0, len(a), batch_size):
            x = torch.stack([self.transform(im) for im in a[i : i + batch_size]]).to(p.device, p.dtype)
            y = torch.stack([self.transform(im) for im in b[i : i + batch_size]]).to(p.device, p.dtype)
            with torch.inference_mode():
                out.append(self(x, y))
        return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# The toy world's judge in the three roles (kind 'world'): ground truth for images of the world


def _judge_pixels(image: Image.Image) -> Tensor:
    """One PIL image -> (3, 64, 64) float32 in [0, 1], as the judge reads it."""
    return to_pixels([image])[0]


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"texts must be a list of strings, got the string {texts!r}: wrap it as [prompt]")
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError(f"texts must be a list of strings, got {[type(t).__name__ for t in texts]}")
    return texts


class WorldEmbedding(_EvalOnly):
    """DINO role: the judge's penultimate features (trained to tell every attribute apart), L2-normalised."""

    def __init__(self, judge: Judge) -> None:
        super().__init__()
        self.judge = judge.eval().requires_grad_(False)
        self.name, self.calibrated, self.dim = "world judge: embedding", True, judge.embed_dim

    def encode_images(self, images: Sequence[Image.Image], *, batch_size: int = 256) -> Tensor:
        """(N, embed_dim) float32 unit embeddings on the module's device."""
        return _encode_batches(self, images, _judge_pixels,
                               lambda x: F.normalize(self.judge(x)[1].float(), dim=-1), batch_size)


class WorldAttributes(_EvalOnly):
    """CLIP role: images as the attributes the judge reads, texts as the attributes they name, one-hot rows over
    `attributes` (default all 7; `IDENTITY` for the identity-only CLIP-I)."""

    # Rows are 0/1 one-hots concatenated over the attributes (D = their classes). Image-image cosine is the share of
    # attributes two images agree on (CLIP-I: every image names every attribute). Text-image: `text_image_scores`,
    # the share of the attributes the prompt names that the image has, whatever their number (a cosine would be
    # agree / sqrt(7 k), capped at sqrt(k / 7) for a prompt naming k of the 7).

    def __init__(self, judge: Judge, attributes: Sequence[str] | None = None, name: str = "world judge: attributes"):
        super().__init__()
        self.judge = judge.eval().requires_grad_(False)
        self.name, self.calibrated = name, True
        self.attributes = list(attributes or judge.classes)
        sizes = [len(judge.classes[k]) for k in self.attributes]
        self.offsets = dict(zip(self.attributes, [sum(sizes[:i]) for i in range(len(sizes))], strict=True))
        self.dim: int = sum(sizes)

    def _one_hot(self, index: dict[str, Tensor], n: int, device: torch.device) -> Tensor:
        """{attribute: (n,) class index, -1 = not named} -> (n, dim) 0/1 rows (all-zero when nothing is named)."""
        out = torch.zeros(n, self.dim, device=device)
        for k, idx in index.items():
            if k not in self.offsets:
                continue
            named = idx >= 0
            out[named.nonzero()[:, 0], self.offsets[k] + idx[named]] = 1.0
        return out

    def encode_images(self, images: Sequence[Image.Image], *, batch_size: int = 256) -> Tensor:
        """(N, dim) float32: the judge's reading of each image as one-hot rows."""
        def embed(x: Tensor) -> Tensor:
            logits, _ = self.judge(x)
            return self._one_hot({k: v.argmax(-1) for k, v in logits.items()}, x.shape[0], x.device)
        return _encode_batches(self, images, _judge_pixels, embed, batch_size)

    @staticmethod
    def text_image_scores(texts: Tensor, images: Tensor) -> Tensor:
        """(N,) CLIP-T of aligned (prompt, image) rows: the share of the attributes a prompt names that the image
        has (NaN for a prompt naming none)."""
        named = texts.sum(-1)
        return (texts * images).sum(-1) / named.where(named > 0, torch.full_like(named, float("nan")))

    def encode_texts(self, texts: Sequence[str], *, batch_size: int = 256) -> Tensor:
        """(N, dim) float32: the attributes each prompt names as unit one-hot rows (unknown words ignored)."""
        _check_batch_size(batch_size)
        parsed = [parse_prompt(t) for t in _check_texts(texts)]
        index = {k: torch.tensor([v.index(p[k]) if k in p else -1 for p in parsed], dtype=torch.long)
                 for k, v in self.judge.classes.items()}
        device = _first_param(self).device
        return self._one_hot({k: v.to(device) for k, v in index.items()}, len(parsed), device)


class WorldDistance(_EvalOnly):
    """LPIPS role (DIV): 1 - cosine of the judge's unit embeddings, in [0, 1]; 0 for images the judge sees alike."""

    # Chosen over a mean pixel difference so that diversity counts what the judge reads (object, colours, pose,
    # scene), not specks or sampling noise; in [0, 1] because the embeddings are non-negative (after a ReLU).

    def __init__(self, judge: Judge) -> None:
        super().__init__()
        self.embedding = WorldEmbedding(judge)
        self.name, self.calibrated = "world judge: 1 - embedding cosine", True

    def distances(self, a: Sequence[Image.Image], b: Sequence[Image.Image], *, batch_size: int = 256) -> Tensor:
        """(N,) float32 distances of the pairs (a[i], b[i]) on the module's device."""
        a, b = _rgb(a, "a"), _rgb(b, "b")
        if len(a) != len(b):
            raise ValueError(f"distances scores pairs (a[i], b[i]): got {len(a)} and {len(b)} images; pass "
                             f"equal-length lists (use metrics.within_group_pairs to form the pairs of one group)")
        ea = self.embedding.encode_images(a, batch_size=batch_size)  # (N, D) unit
        eb = self.embedding.encode_images(b, batch_size=batch_size)
        return 1 - (ea * eb).sum(-1)


# ---------------------------------------------------------------------------------------------
# Loaders


class WorldIdentityEmbedding(_EvalOnly):
    """Identity-only DINO role: the judge's class probabilities of shape, body colour, marking and marking colour,
    concatenated (background, size and position left out, so a photo's scene does not count as the subject)."""

    def __init__(self, judge: Judge) -> None:
        super().__init__()
        self.judge = judge.eval().requires_grad_(False)
        self.name, self.calibrated = "world judge: identity probabilities", True
        self.dim: int = sum(len(judge.classes[k]) for k in IDENTITY)

    def encode_images(self, images: Sequence[Image.Image], *, batch_size: int = 256) -> Tensor:
        """(N, dim) float32 unit rows."""
        def embed(x: Tensor) -> Tensor:
            logits, _ = self.judge(x)
            return F.normalize(torch.cat([logits[k].softmax(-1) for k in IDENTITY], -1).float(), dim=-1)
        return _encode_batches(self, images, _judge_pixels, embed, batch_size)


def load_world(device: str | torch.device = "cpu") -> dict[str, nn.Module]:
    """The committed world judge in the three roles, {'dino': embedding, 'clip': attributes, 'lpips': distance}, and
    the identity-only ones that `evaluation.score` adds when present: {'dino_identity', 'clip_identity'}."""
    try:
        judge = load_judge(device=device)
    except JudgeLoadError as err:
        raise EncoderLoadError(str(err)) from err
    return {"dino": WorldEmbedding(judge), "clip": WorldAttributes(judge), "lpips": WorldDistance(judge),
            "dino_identity": WorldIdentityEmbedding(judge),
            "clip_identity": WorldAttributes(judge, IDENTITY, "world judge: identity attributes")}


def load_dino(kind: str = "real", device: str | torch.device = "cpu", *, cache_dir: str | Path | None = None) -> DinoEncoder:
    """DINO ViT-S/16 (`real`, via timm) or a 2-layer random ViT with D=64 (`tiny`)."""
    _check_kind(kind)
    if kind == "world":
        return load_world(device)["dino"]
    if kind == "tiny":
        with _seeded(TINY_SEED):
            model = VisionTransformer(img_size=224, patch_size=16, embed_dim=TINY_DIM, depth=2, num_heads=2,
                                      num_classes=0, global_pool="token")
        return DinoEncoder(model, name="dino-tiny-uncalibrated", calibrated=False).to(device)

    backbone = f"DINO ViT-S/16 backbone (timm '{DINO_MODEL}')"
    repo = timm.models.get_pretrained_cfg(DINO_MODEL).hf_hub_id
    # Offline, timm would build the model (~2 s) before finding no weights: check the hub cache first.
    if repo and _hub_offline() and not _hf_cached(repo, ("model.safetensors", "pytorch_model.bin"), cache_dir):
        raise _unavailable(backbone, f"HF_HUB_OFFLINE is set and {repo} is not in the Hugging Face cache")
    try:
        kw = {} if cache_dir is None else {"cache_dir": cache_dir}  # older timm 1.0.x lacks the argument
        model = timm.create_model(DINO_MODEL, pretrained=True, num_classes=0, **kw)
    except (OSError, RuntimeError, ValueError) as err:
        raise _unavailable(backbone, f"loading the weights failed ({type(err).__name__})") from err
    return DinoEncoder(model, name="dino-vits16", calibrated=True).to(device)


def load_clip(kind: str = "real", device: str | torch.device = "cpu", *, cache_dir: str | Path | None = None) -> ClipEncoder:
    """CLIP ViT-B/32 with OpenAI weights (`real`, via open_clip) or a 2-layer random CLIP with D=64 (`tiny`)."""
    _check_kind(kind)
    if kind == "world":
        return load_world(device)["clip"]
    tokenizer = open_clip.get_tokenizer(CLIP_MODEL)  # CLIP's BPE, shipped inside the open_clip wheel
    if kind == "tiny":
        with _seeded(TINY_SEED):
            model = open_clip.CLIP(
                embed_dim=TINY_DIM,
                vision_cfg=open_clip.CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=32, image_size=224),
                text_cfg=open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
                quick_gelu=True,  # as OpenAI's ViT-B/32
            )
        return ClipEncoder(model, clip_preprocess(), tokenizer, name="clip-tiny-uncalibrated", calibrated=False).to(device)

    # open_clip fetches the weights before building the model, so it fails fast offline without a pre-check.
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            CLIP_MODEL, pretrained=CLIP_PRETRAINED, cache_dir=None if cache_dir is None else str(cache_dir)
        )
    except (OSError, RuntimeError, ValueError) as err:
        raise _unavailable(f"CLIP ViT-B/32 backbone (open_clip '{CLIP_MODEL}', pretrained='{CLIP_PRETRAINED}')",
                           f"loading the weights failed ({type(err).__name__})") from err
    return ClipEncoder(model, preprocess, tokenizer, name="clip-vitb32-openai", calibrated=True).to(device)


def load_lpips(kind: str = "real", device: str | torch.device = "cpu", *, size: int = LPIPS_SIZE) -> LpipsDistance:
    """LPIPS-AlexNet from torchmetrics: ImageNet backbone (`real`) or a seeded random backbone (`tiny`).

    Both use the linear-layer weights shipped inside torchmetrics; the real backbone's ImageNet weights
    come from torchvision (downloaded once into torch.hub's cache, `$TORCH_HOME`).
    """
    _check_kind(kind)
    if kind == "world":
        return load_world(device)["lpips"]
    if kind == "tiny":
        with _seeded(TINY_SEED):
            # pnet_rand: torchvision AlexNet(weights=None), no download; `pretrained` here means the lin layers.
            net = _NoTrainLpips(pretrained=True, net="alex", pnet_rand=True)
        return LpipsDistance(net, name="lpips-alex-random-uncalibrated", calibrated=False, size=size).to(device)

    backbone = "LPIPS AlexNet backbone (torchvision AlexNet_Weights.IMAGENET1K_V1)"
    url = AlexNet_Weights.DEFAULT.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    # The project's offline switch (HF_HUB_OFFLINE) also covers torchvision's download, which has none.
    if _hub_offline() and not cached.is_file():
        raise _unavailable(backbone, f"HF_HUB_OFFLINE is set and {cached} does not exist")
    try:
        net = PublicLpips(LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="none"))
    except (OSError, RuntimeError, ValueError) as err:
        raise _unavailable(backbone, f"loading the weights failed ({type(err).__name__})") from err
    return LpipsDistance(net, name="lpips-alex", calibrated=True, size=size).to(device)


def load_encoders(kind: str = "real", device: str | torch.device = "cpu", *,
                  cache_dir: str | Path | None = None) -> dict[str, nn.Module]:
    """{'dino': DinoEncoder, 'clip': ClipEncoder, 'lpips': LpipsDistance}, all `real` or all `tiny`; `world`: the
    world judge in the three roles (`load_world`)."""
    _check_kind(kind)
    if kind == "world":
        return load_world(device)
    return {
        "dino": load_dino(kind, device, cache_dir=cache_dir),
        "clip": load_clip(kind, device, cache_dir=cache_dir),
        "lpips": load_lpips(kind, device),
    }
