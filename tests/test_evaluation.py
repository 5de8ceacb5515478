"""The evaluation protocol: DreamBench prompts, scoring against numpy, the real-vs-real reference, encoder info."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_pl.evaluation import (
    EvalPrompt,
    Protocol,
    check_seeds_apart,
    encoder_info,
    protocol_prompts,
    real_vs_real,
    score,
)

from .conftest import SHARED_DATA


def test_protocol_prompts_with_and_without_identifier():
    if not (SHARED_DATA / "prompts_object.txt").is_file():
        pytest.skip("DreamBench data absent")
    for kind in ("object", "live"):
        ps = protocol_prompts(SHARED_DATA, kind, "sks", "dog")
        assert len(ps) == 25 and [p.index for p in ps] == list(range(25))
        assert all("sks dog" in p.prompt and "sks" not in p.prompt_no_token for p in ps)
        assert all("  " not in p.prompt_no_token and " dog" in p.prompt_no_token for p in ps)
    assert protocol_prompts(SHARED_DATA, "object", "sks", "can")[20].prompt_no_token == "a red can"


def test_protocol_prompts_fill_the_templates(tmp_path):
    (tmp_path / "prompts_live.txt").write_text("a {0} {1} in the snow\n\na red {0} {1}\n")
    ps = protocol_prompts(tmp_path, "live", "sks", "dog")
    assert ps == [EvalPrompt(0, "a sks dog in the snow", "a dog in the snow", "a {0} {1} in the snow"),
                  EvalPrompt(1, "a red sks dog", "a red dog", "a red {0} {1}")]


class FakeEncoder:
    """Deterministic embeddings: images -> mean RGB + 1; texts -> a vector that depends on 'sks'."""

    name, calibrated = "fake", False

    def encode_images(self, images):
        return torch.tensor(np.stack([np.asarray(i, dtype=np.float64).mean((0, 1)) / 255 + [1, 0, 0] for i in images]))

    def encode_texts(self, texts):
        return torch.tensor([[1.0, 2.0, 0.0] if "sks" in t else [1.0, 0.0, 2.0] for t in texts], dtype=torch.float64)

    def distances(self, a, b):
        return torch.tensor([float(np.abs(np.asarray(x, float) - np.asarray(y, float)).mean()) for x, y in zip(a, b, strict=True)])


def solid(rgb) -> Image.Image:
    return Image.new("RGB", (8, 8), tuple(rgb))


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_score_matches_numpy():
    enc = {"dino": FakeEncoder(), "clip": FakeEncoder(), "lpips": FakeEncoder()}
    rng = np.random.default_rng(0)
    real = [solid(rng.integers(0, 255, 3)) for _ in range(3)]
    gens = [[solid(rng.integers(0, 255, 3)) for _ in range(4)] for _ in range(2)]
    cls = [solid(rng.integers(0, 255, 3)) for _ in range(5)]
    groups = [(EvalPrompt(i, f"a sks can {i}", f"a can {i}"), [0, 1, 2, 3], g) for i, g in enumerate(gens)]
    s = score(enc, real, groups, cls)
    emb = lambda ims: unit([np.asarray(i, float).mean((0, 1)) / 255 + [1, 0, 0] for i in ims])  # noqa: E731
    r, g_all = emb(real), emb([i for g in gens for i in g])
    assert s.metrics["dino"] == pytest.approx((r @ g_all.T).mean(), abs=1e-9)
    assert s.metrics["clip_i"] == pytest.approx((r @ g_all.T).mean(), abs=1e-9)
    assert s.metrics["pres"] == pytest.approx((r @ emb(cls).T).mean(), abs=1e-9)
    assert s.metrics["clip_t"] == pytest.approx((g_all @ unit([1, 2, 0])).mean(), abs=1e-9)
    assert s.metrics["clip_t_no_token"] == pytest.approx((g_all @ unit([1, 0, 2])).mean(), abs=1e-9)
    dists = [np.abs(np.asarray(g[i], float) - np.asarray(g[j], float)).mean() for g in gens for i in range(4) for j in range(i + 1, 4)]
    assert s.metrics["div"] == pytest.approx(np.mean(dists), abs=1e-9)
    assert len(s.rows) == 8 and len(s.per_prompt) == 2
    assert s.rows[0]["dino"] == pytest.approx((r @ g_all[0]).mean(), abs=1e-9)


def test_real_vs_real_excludes_self_pairs_and_self_scores_one():
    enc = {"dino": FakeEncoder(), "clip": FakeEncoder()}
    photos = [solid((10, 200, 30)), solid((200, 10, 30)), solid((30, 30, 200))]
    e = unit([np.asarray(p, float).mean((0, 1)) / 255 + [1, 0, 0] for p in photos])
    sims = e @ e.T
    expect = (sims.sum() - np.trace(sims)) / 6
    assert real_vs_real(enc, photos)["dino"] == pytest.approx(expect, abs=1e-9)
    assert real_vs_real(enc, photos[:1])["dino"] == pytest.approx(1.0, abs=1e-9)


class CalibratedEncoder(FakeEncoder):
    name, calibrated = "real", True


def test_encoder_info_names_the_encoders_and_says_whether_all_are_calibrated():
    real = {"dino": CalibratedEncoder(), "clip": CalibratedEncoder()}
    assert encoder_info(real) == {"encoders": {"dino": "real", "clip": "real"}, "calibrated": True}
    mixed = {**real, "lpips": FakeEncoder()}
    assert encoder_info(mixed) == {"encoders": {"dino": "real", "clip": "real", "lpips": "fake"}, "calibrated": False}
    # An encoder without a name is listed under its key, and one that does not say it is calibrated is not.
    assert encoder_info({**real, "other": object()}) == {
        "encoders": {"dino": "real", "clip": "real", "other": "other"}, "calibrated": False}


def test_evaluation_seeds_are_kept_apart_from_the_class_images_seeds():
    assert Protocol().seed >= 200  # the default is past the default 200 class images (seeds 0..199)
    check_seeds_apart(Protocol(), 100, prior_seed=0, num_class_images=200)
    check_seeds_apart(Protocol(seed=0), 100, prior_seed=100, num_class_images=50)  # 0..99 vs 100..149: apart
    with pytest.raises(ValueError, match=r"eval.protocol.seed=150 .*150..249.* overlap .*0..199"):
        check_seeds_apart(Protocol(seed=150), 100, prior_seed=0, num_class_images=200)
    with pytest.raises(ValueError, match="data.prior.seed"):
        check_seeds_apart(Protocol(seed=10_000), 4, prior_seed=9_999, num_class_images=2)
