"""Tests for dreambooth_pl.losses: forward noising, training targets, prior-preservation loss, LR schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from dreambooth_pl.losses import (
    diffusion_target,
    fixed_draws,
    flow_loss_weights,
    flow_noised,
    flow_target,
    prior_preservation_loss,
    q_sample,
    timestep_density,
)

SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
)


def sd_alphas_cumprod() -> np.ndarray:
    """SD's scaled_linear schedule in float64 numpy: betas = linspace(sqrt(b0), sqrt(b1), 1000) ** 2."""
    betas = np.linspace(np.sqrt(0.00085), np.sqrt(0.012), 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def batch(seed: int = 0, b: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents, noise, timesteps) with one distinct timestep per row, first and last included."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(b, 4, 8, 8, generator=g)
    noise = torch.randn(b, 4, 8, 8, generator=g)
    timesteps = torch.tensor([0, 1, 500, 999][:b])
    return latents, noise, timesteps


def per_row(coef: np.ndarray) -> np.ndarray:
    return coef.reshape(-1, 1, 1, 1)


# ------------------------------------------------------------------------------------------ q_sample


def test_numpy_schedule_matches_diffusers_scaled_linear():
    """The reference schedule used below is the one diffusers builds for SD (guards the references)."""
    sched = DDPMScheduler(**SD_SCHEDULE)
    np.testing.assert_allclose(sched.alphas_cumprod.double().numpy(), sd_alphas_cumprod(), rtol=1e-5)


def test_q_sample_matches_numpy_forward_diffusion():
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, each row with its own timestep."""
    latents, noise, t = batch()
    ac = sd_alphas_cumprod()
    out = q_sample(latents, noise, t, torch.from_numpy(ac))
    a = per_row(ac[t.numpy()])
    expected = np.sqrt(a) * latents.double().numpy() + np.sqrt(1 - a) * noise.double().numpy()
    assert out.shape == latents.shape and out.dtype == latents.dtype
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_q_sample_matches_diffusers_add_noise():
    """Same result as DDPMScheduler.add_noise with SD's schedule."""
    latents, noise, t = batch(seed=1)
    sched = DDPMScheduler(**SD_SCHEDULE)
    torch.testing.assert_close(
        q_sample(latents, noise, t, sched.alphas_cumprod), sched.add_noise(latents, noise, t)
    )


# ------------------------------------------------------------------------------------- diffusion_target


def test_epsilon_target_is_the_noise():
    """Epsilon prediction trains the UNet to output the added noise."""
    latents, noise, t = batch()
    out = diffusion_target("epsilon", latents, noise, t, torch.from_numpy(sd_alphas_cumprod()))
    assert torch.equal(out, noise)


def test_v_prediction_target_matches_numpy():
    """v = sqrt(a_t) eps - sqrt(1 - a_t) x0 per row."""
    latents, noise, t = batch(seed=3)
    ac = sd_alphas_cumprod()
    out = diffusion_target("v_prediction", latents, noise, t, torch.from_numpy(ac))
    a = per_row(ac[t.numpy()])
    expected = np.sqrt(a) * noise.double().numpy() - np.sqrt(1 - a) * latents.double().numpy()
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_v_prediction_target_matches_diffusers_get_velocity():
    """Same result as DDPMScheduler(prediction_type='v_prediction').get_velocity."""
    latents, noise, t = batch(seed=4)
    sched = DDPMScheduler(**SD_SCHEDULE, prediction_type="v_prediction")
    out = diffusion_target("v_prediction", latents, noise, t, sched.alphas_cumprod)
    torch.testing.assert_close(out, sched.get_velocity(latents, noise, t))


@pytest.mark.parametrize("kind", ["sample", "flow"])
def test_unsupported_prediction_type_raises_naming_it(kind):
    """Any prediction type other than epsilon / v_prediction is a ValueError that names it."""
    latents, noise, t = batch()
    with pytest.raises(ValueError, match=kind):
        diffusion_target(kind, latents, noise, t, torch.from_numpy(sd_alphas_cumprod()))


# ------------------------------------------------------------------------------- prior_preservation_loss


def rows(seed: int, n_rows: int) -> torch.Tensor:
    return torch.randn(n_rows, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.mean((a.double().numpy() - b.double().numpy()) ** 2))


def test_prior_loss_is_instance_plus_weighted_class_mse():
    """total = mse(rows [0, n)) + weight * mse(rows [n, 2n)), checked in numpy."""
    n, w = 2, 0.7
    pred, target = rows(0, 2 * n), rows(1, 2 * n)
    total, parts = prior_preservation_loss(pred, target, n, w)
    inst, prior = mse(pred[:n], target[:n]), mse(pred[n:], target[n:])
    assert parts["instance"].item() == pytest.approx(inst, rel=1e-5)
    assert parts["prior"].item() == pytest.approx(prior, rel=1e-5)
    assert total.item() == pytest.approx(inst + w * prior, rel=1e-5)


def test_prior_weight_zero_gives_instance_loss():
    """With weight 0 the class rows do not contribute to the total."""
    pred, target = rows(2, 6), rows(3, 6)
    total, parts = prior_preservation_loss(pred, target, 3, 0.0)
    assert parts["prior"].item() > 0
    assert parts["prior"].item() == pytest.approx(mse(pred[3:], target[3:]), rel=1e-5)  # computed, then weighed 0
    assert total.item() == pytest.approx(mse(pred[:3], target[:3]), rel=1e-5)


@pytest.mark.parametrize("perturbed", ["instance", "prior"])
def test_prior_loss_row_order(perturbed):
    """Rows [0, n) feed only 'instance' and rows [n, 2n) only 'prior'."""
    n = 2
    pred, target = rows(4, 2 * n), rows(5, 2 * n)
    _, before = prior_preservation_loss(pred, target, n)
    changed = pred.clone()
    changed[slice(0, n) if perturbed == "instance" else slice(n, 2 * n)] += 1.0
    _, after = prior_preservation_loss(changed, target, n)
    other = "prior" if perturbed == "instance" else "instance"
    assert after[perturbed].item() != pytest.approx(before[perturbed].item(), rel=1e-3)
    rows_of = slice(0, n) if perturbed == "instance" else slice(n, 2 * n)
    assert after[perturbed].item() == pytest.approx(mse(changed[rows_of], target[rows_of]), rel=1e-5)
    assert after[other].item() == before[other].item()


def test_prior_loss_without_class_rows():
    """A batch of instance rows only: prior is 0 and total equals the instance loss."""
    pred, target = rows(6, 3), rows(7, 3)
    total, parts = prior_preservation_loss(pred, target, 3, 1.0)
    assert parts["prior"].item() == 0.0
    assert total.item() == parts["instance"].item() == pytest.approx(mse(pred, target), rel=1e-5)


def test_prior_loss_reduces_half_precision_in_float32():
    """bf16 predictions give a float32 loss equal to the float32 computation on the same values."""
    pred, target = rows(8, 4).bfloat16(), rows(9, 4).bfloat16()
    total, _ = prior_preservation_loss(pred, target, 2)
    ref, _ = prior_preservation_loss(pred.float(), target.float(), 2)
    assert total.dtype == torch.float32
    assert total.item() == ref.item()
    # The bf16 values themselves, reduced in float64: instance rows [0, 2) plus class rows [2, 4).
    assert total.item() == pytest.approx(mse(pred[:2], target[:2]) + mse(pred[2:], target[2:]), rel=1e-5)


def test_fixed_draws_depend_only_on_each_rows_seed():
    """A validation image's noise and timesteps come from its own seed: the same in any batch, row order or run."""
    noise, t = fixed_draws([3, 7], (4, 2, 2), draws=3, num_train_timesteps=1000)
    assert noise.shape == (3, 2, 4, 2, 2) and t.shape == (3, 2) and t.dtype == torch.int64
    alone, t_alone = fixed_draws([7], (4, 2, 2), draws=3, num_train_timesteps=1000)
    assert torch.equal(alone[:, 0], noise[:, 1]) and torch.equal(t_alone[:, 0], t[:, 1])
    g = torch.Generator().manual_seed(3)  # row 0 by hand: K noise draws, then K timesteps, from seed 3
    by_hand = torch.stack([torch.randn((4, 2, 2), generator=g) for _ in range(3)])
    assert torch.equal(noise[:, 0], by_hand) and torch.equal(t[:, 0], torch.randint(0, 1000, (3,), generator=g))
    assert not torch.equal(noise[0, 0], noise[1, 0]) and 0 <= t.min() and t.max() < 1000


def test_a_mask_weights_the_instance_rows_pixels_and_leaves_the_class_rows():
    pred, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    target[0, :, 0, 0] = 3.0  # the instance row's error is 9 in one cell, 1 elsewhere
    mask = torch.zeros(1, 1, 2, 2)
    mask[0, 0, 0, 0] = 1.0
    _, parts = prior_preservation_loss(pred, target, 1, mask=mask)
    assert parts["instance"].item() == pytest.approx(9.0) and parts["prior"].item() == pytest.approx(1.0)
    _, unmasked = prior_preservation_loss(pred, target, 1)
    assert unmasked["instance"].item() == pytest.approx((9 + 3) / 4)
    half = torch.full((1, 1, 2, 2), 0.5)  # a uniform mask weights nothing
    assert prior_preservation_loss(pred, target, 1, mask=half)[1]["instance"].item() == pytest.approx(3.0)


def test_flow_matching_pieces_are_diffusers():
    """x_t and the velocity target as diffusers' SD3 / Flux examples; the weighting and sigma-sampling schemes as
    diffusers' training_utils (same draws from the same seed)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    x0, eps, s = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4), torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(flow_noised(x0, eps, s), (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps)
    assert torch.equal(flow_target(x0, eps), eps - x0)
    for scheme in ("logit_normal", "mode", "none"):
        torch.manual_seed(0)
        want = compute_density_for_timestep_sampling(scheme, 5, logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
        assert torch.allclose(timestep_density(scheme, 5, torch.Generator().manual_seed(0)), want.clamp(0, 1 - 1e-6))
    for scheme in ("sigma_sqrt", "cosmap", "logit_normal"):
        assert torch.allclose(flow_loss_weights(scheme, s), compute_loss_weighting_for_sd3(scheme, s).float())
