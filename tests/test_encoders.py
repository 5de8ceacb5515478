"""Evaluation encoders: tiny (random, offline) variants end to end; `real` only as the offline error."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
from torchvision.models import alexnet

from dreambooth_pl import encoders as enc
from dreambooth_pl.metrics import PairwiseCosine

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _image(seed: int, size: tuple[int, int] = (72, 48)) -> Image.Image:
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _np_unit(x: torch.Tensor) -> np.ndarray:
    a = x.numpy().astype(np.float64)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _resized_crop(img: Image.Image, short: int, crop: int) -> np.ndarray:
    """By hand with PIL: bicubic resize of the shorter side to `short`, centre `crop` square; (crop, crop, 3) in [0, 1]."""
    w, h = img.size
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    left, top = round((size[0] - crop) / 2), round((size[1] - crop) / 2)
    out = img.resize(size, Image.BICUBIC).crop((left, top, left + crop, top + crop))
    return np.asarray(out, dtype=np.float32) / 255


def _dino_reference(dino, images: list[Image.Image]) -> np.ndarray:
    """DINO embeddings from hand-made pixels: the model's post-norm CLS token, normalised in float64 numpy."""
    pixels = [(_resized_crop(im, 256, 224) - np.array(enc.IMAGENET_MEAN, np.float32))
              / np.array(enc.IMAGENET_STD, np.float32) for im in images]
    x = torch.from_numpy(np.stack(pixels).transpose(0, 3, 1, 2).copy())
    with torch.inference_mode():
        cls = dino.model.forward_features(x)[:, 0]
    return _np_unit(cls)


@contextmanager
def no_network(calls: list):
    """Every route to a download records the attempt and raises an OSError (as a dead network would)."""

    def refuse(what: str):
        def _refuse(*args, **kwargs):
            calls.append(what)
            raise ConnectionRefusedError(f"network disabled in this test ({what})")

        return _refuse

    import huggingface_hub
    import torchvision._internally_replaced_utils as tv_utils
    import torchvision.models._api as tv_api

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse("socket.connect"))
        mp.setattr(socket, "create_connection", refuse("socket.create_connection"))
        mp.setattr(socket, "getaddrinfo", refuse("socket.getaddrinfo"))
        mp.setattr(torch.hub, "load_state_dict_from_url", refuse("torch.hub.load_state_dict_from_url"))
        mp.setattr(torch.hub, "download_url_to_file", refuse("torch.hub.download_url_to_file"))
        mp.setattr(tv_utils, "load_state_dict_from_url", refuse("torchvision load_state_dict_from_url"))
        mp.setattr(tv_api, "load_state_dict_from_url", refuse("torchvision weights download"))
        mp.setattr(huggingface_hub, "hf_hub_download", refuse("huggingface_hub.hf_hub_download"))
        yield


@pytest.fixture(scope="module")
def tiny() -> dict:
    """All tiny encoders, built with every download route refused; `calls` records any attempt."""
    calls: list[str] = []
    with no_network(calls):
        encoders = enc.load_encoders("tiny")
    encoders["calls"] = calls
    return encoders


# ---------------------------------------------------------------------------------------------
# DINO


def test_dino_tiny_embeddings_are_unit_and_batched(tiny):
    dino = tiny["dino"]
    images = [_image(0), _image(1, (40, 90)), _image(2)]
    z = dino.encode_images(images, batch_size=2)
    assert z.shape == (3, enc.TINY_DIM) and z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(dino.encode_images(images, batch_size=1), z)
    assert (z[0] @ z[1]).item() < 1 - 1e-4  # different images, different embeddings
    ref = _dino_reference(dino, images)
    np.testing.assert_allclose(z.numpy(), ref, atol=1e-5)
    assert (z[0] @ z[1]).item() == pytest.approx(float(ref[0] @ ref[1]), abs=1e-5)
    assert dino.encode_images([]).shape == (0, enc.TINY_DIM)


def test_dino_tiny_is_deterministic_and_keeps_the_callers_rng(tiny):
    images = [_image(3), _image(4)]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again = enc.load_dino("tiny")
    assert torch.equal(torch.rand(3), expected_next)  # building the tiny model did not consume the global RNG
    assert torch.equal(again.encode_images(images), tiny["dino"].encode_images(images))


def test_dino_transform_matches_manual_pipeline(tiny):
    img = _image(5, (300, 200))  # non-square: shorter side 200 -> 256, longer 300 -> 384
    got = tiny["dino"].transform(img)
    assert got.shape == (3, 224, 224)
    # By hand with PIL + numpy: bicubic resize to 384x256, centre 224 crop at (80, 16), ImageNet normalisation.
    ref = np.asarray(img.resize((384, 256), Image.BICUBIC).crop((80, 16, 304, 240)), dtype=np.float32) / 255
    ref = (ref - np.array(enc.IMAGENET_MEAN, np.float32)) / np.array(enc.IMAGENET_STD, np.float32)
    np.testing.assert_allclose(got.numpy(), ref.transpose(2, 0, 1), atol=1e-5)


def test_dino_embedding_is_the_post_norm_cls_token(tiny):
    dino = tiny["dino"]
    img = _image(6)
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        dino.model.norm.register_forward_hook(lambda m, i, o: seen.update(normed=o)),
        dino.model.blocks[-1].register_forward_hook(lambda m, i, o: seen.update(last_block=o)),
    ]
    try:
        z = dino.encode_images([img])
    finally:
        for h in hooks:
            h.remove()
    assert seen["normed"].shape == (1, 1 + 14 * 14, enc.TINY_DIM)  # CLS + 196 patch tokens
    torch.testing.assert_close(z, F.normalize(seen["normed"][:, 0], dim=-1))
    # The other plausible poolings give different vectors, so the assertion above pins the choice.
    assert not torch.allclose(z, F.normalize(seen["last_block"][:, 0], dim=-1), atol=1e-3)  # pre-norm CLS
    assert not torch.allclose(z, F.normalize(seen["normed"][:, 1:].mean(1), dim=-1), atol=1e-3)  # mean of patches


def test_identical_images_score_one(tiny):
    img = _image(7, (64, 64))
    z = tiny["dino"].encode_images([img, img.copy(), img.convert("RGBA"), img.convert("RGBA").convert("RGB")])
    torch.testing.assert_close(z @ z.T, torch.ones(4, 4))
    metric = PairwiseCosine()
    metric.update(z[:1], tiny["dino"].encode_images([img]))
    assert abs(metric.compute().item() - 1.0) < 1e-6


def test_encoders_reject_non_images(tiny):
    with pytest.raises(TypeError, match="PIL"):
        tiny["dino"].encode_images([np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(TypeError, match="list"):
        tiny["dino"].encode_images(_image(0))


# ---------------------------------------------------------------------------------------------
# CLIP


def test_clip_tiny_texts_and_images(tiny):
    clip = tiny["clip"]
    t = clip.encode_texts(["a photo of a dog", "a photo of a cat", "a photo of a dog"])
    assert t.shape == (3, enc.TINY_DIM) and t.dtype == torch.float32
    torch.testing.assert_close(t.norm(dim=1), torch.ones(3))
    assert (t[0] @ t[1]).item() < 1 - 1e-4 and torch.allclose(t[0], t[2])
    # Expected values: the model's raw (unnormalised) outputs, one text or image at a time, normalised in numpy.
    with torch.inference_mode():
        raw_t = torch.cat([clip.model.encode_text(clip.tokenizer([x])) for x in ("a photo of a dog", "a photo of a cat")])
    ref_t = _np_unit(raw_t)
    np.testing.assert_allclose(t[:2].numpy(), ref_t, atol=1e-5)
    assert (t[0] @ t[1]).item() == pytest.approx(float(ref_t[0] @ ref_t[1]), abs=1e-5)
    images = [_image(8), _image(9, (50, 70))]
    i = clip.encode_images(images)
    assert i.shape == (2, enc.TINY_DIM)
    torch.testing.assert_close(i.norm(dim=1), torch.ones(2))
    with torch.inference_mode():
        raw_i = torch.cat([clip.model.encode_image(clip.preprocess(im)[None]) for im in images])
    np.testing.assert_allclose(i.numpy(), _np_unit(raw_i), atol=1e-5)
    with pytest.raises(TypeError, match="list of strings"):
        clip.encode_texts("a photo of a dog")


def test_clip_uses_open_clip_tokenizer(tiny):
    import open_clip

    clip = tiny["clip"]
    assert isinstance(clip.tokenizer, open_clip.tokenizer.SimpleTokenizer)
    ids = clip.tokenizer(["a photo of a dog"])[0]
    assert ids.shape == (77,) and ids[0] == 49406 and 49407 in ids.tolist()  # <start> ... <end>, 0-padded
    with torch.inference_mode():
        expected = clip.model.encode_text(clip.tokenizer(["a photo of a dog"]), normalize=True)
    torch.testing.assert_close(clip.encode_texts(["a photo of a dog"]), expected)


def test_clip_preprocess_matches_openai_pipeline(tiny):
    img = _image(10, (300, 200))  # shorter side 200 -> 224, longer 300 -> 336, centre crop at (56, 0)
    got = tiny["clip"].preprocess(img)
    ref = np.asarray(img.resize((336, 224), Image.BICUBIC).crop((56, 0, 280, 224)), dtype=np.float32) / 255
    ref = (ref - np.array(OPENAI_MEAN, np.float32)) / np.array(OPENAI_STD, np.float32)
    np.testing.assert_allclose(got.numpy(), ref.transpose(2, 0, 1), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# LPIPS


def test_lpips_tiny_distances(tiny):
    lpips = tiny["lpips"]
    x, y = _image(11), _image(12, (90, 60))
    d = lpips.distances([x, y, x], [y, x, x.copy()])  # d(x, y), d(y, x), d(x, x)
    assert d.shape == (3,) and d.dtype == torch.float32
    assert d[0] > 1e-3
    assert d[0].item() == pytest.approx(_lpips_reference(lpips, x, y), rel=1e-4)
    assert abs(d[0] - d[1]) <= 1e-5 * d[0]
    assert abs(d[2].item()) < 1e-6
    with pytest.raises(ValueError, match="pairs"):
        lpips.distances([x, y], [x])


def _lpips_reference(lpips, a: Image.Image, b: Image.Image) -> float:
    """LPIPS by its definition (Zhang et al. 2018) in float64 numpy, from the backbone's five feature maps:
    sum over layers of the spatial mean of w_l . (unit(f_l(a)) - unit(f_l(b)))^2, units along channels."""
    shift = np.array([-0.030, -0.088, -0.188], np.float32)  # LPIPS's input scaling of [-1, 1] pixels
    scale = np.array([0.458, 0.448, 0.450], np.float32)
    pixels = [(_resized_crop(im, enc.LPIPS_SIZE, enc.LPIPS_SIZE) * 2 - 1 - shift) / scale for im in (a, b)]
    x = torch.from_numpy(np.stack(pixels).transpose(0, 3, 1, 2).copy())
    with torch.inference_mode():
        feats = lpips.net.net(x)  # AlexNet relu1..relu5
    total = 0.0
    for f, lin in zip(feats, lpips.net.lins, strict=True):
        f = f.double().numpy()
        unit = f / np.sqrt(1e-8 + (f**2).sum(axis=1, keepdims=True))
        w = lin.model[-1].weight.double().numpy().reshape(-1)  # the 1x1 conv: one weight per channel
        total += float(np.einsum("c,chw->hw", w, (unit[0] - unit[1]) ** 2).mean())
    return total


def test_lpips_tiny_uses_torchmetrics_linear_heads(tiny):
    # torchmetrics loads them with strict=False, so a key mismatch would silently leave random heads.
    from torchmetrics.functional.image import lpips as tm_lpips

    shipped = torch.load(Path(tm_lpips.__file__).parent / "lpips_models" / "alex.pth", map_location="cpu")
    state = tiny["lpips"].net.state_dict()
    assert shipped and all(torch.equal(state[k], v) for k, v in shipped.items())


def test_tiny_encoders_touch_no_network(tiny):
    assert tiny["calls"] == []
    calls: list[str] = []
    with no_network(calls):
        lp = enc.load_lpips("tiny")
    assert calls == [] and not lp.calibrated


# ---------------------------------------------------------------------------------------------
# Flags and the real kind offline


def test_tiny_encoders_are_flagged_uncalibrated(tiny):
    for key in ("dino", "clip", "lpips"):
        assert tiny[key].calibrated is False
        assert "uncalibrated" in tiny[key].name


def test_encoders_stay_in_eval_mode(tiny):
    for key in ("dino", "clip", "lpips"):
        tiny[key].train()  # as a LightningModule holding them does each epoch
        assert not any(m.training for m in tiny[key].modules())


def test_unknown_kind_is_explained():
    with pytest.raises(ValueError, match="'real'.*'tiny'"):
        enc.load_encoders("small")


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE on (as conftest sets it) and every download route refused."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    calls: list[str] = []
    with no_network(calls):
        yield calls


@pytest.mark.parametrize("load", [enc.load_dino, enc.load_clip])
def test_real_hub_encoders_offline_raise_fast(load, offline, tmp_path):
    with pytest.raises(enc.EncoderLoadError) as info:
        load("real", cache_dir=tmp_path)  # an empty cache, whatever this machine has downloaded
    msg = str(info.value)
    assert "tiny" in msg and "network access" in msg and "uncalibrated" in msg


def test_real_lpips_offline_raises(offline, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert torch.hub.get_dir().startswith(str(tmp_path)), "torch.hub.set_dir was called elsewhere"
    with pytest.raises(enc.EncoderLoadError, match="tiny"):
        enc.load_lpips("real")
    # Without the offline flag torchvision tries the download, and the refused connection is reported the same way.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(enc.EncoderLoadError, match="EVAL=tiny") as info:
        enc.load_lpips("real")
    assert isinstance(info.value.__cause__, OSError) and offline


def test_conftest_keeps_the_hub_offline():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_real_lpips_is_torchmetrics_public_metric_and_computes_lpips(tmp_path, monkeypatch):
    # A stand-in ImageNet AlexNet in torch.hub's cache (seeded random weights): the real path loads it as torchvision
    # would, through torchmetrics' public LearnedPerceptualImagePatchSimilarity, with no network.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(enc.AlexNet_Weights.DEFAULT.url).name
    cached.parent.mkdir(parents=True)
    torch.manual_seed(3)
    torch.save(alexnet().state_dict(), cached)
    real = enc.load_lpips("real")
    assert isinstance(real.net.metric, LearnedPerceptualImagePatchSimilarity) and real.calibrated
    x, y = _image(11), _image(12, (90, 60))
    d = real.distances([x, y, x], [y, x, x.copy()])
    assert d[0].item() == pytest.approx(_lpips_reference(SimpleNamespace(net=real.net.metric.net), x, y), rel=1e-4)
    assert abs(d[2].item()) < 1e-6 and real.distances([x], [y]).shape == (1,)  # no state kept between calls
