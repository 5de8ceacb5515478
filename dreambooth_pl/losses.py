"""Diffusion training math as pure functions: noising, targets, the prior-preservation loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _expand(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # (B,) -> (B, 1, 1, 1) so per-sample coefficients broadcast over latents
    return coef.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def q_sample(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward diffusion x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps; latents/noise (B, C, h, w), timesteps (B,)."""
    a = alphas_cumprod.to(latents.device)[timesteps]
    return _expand(a.sqrt(), latents) * latents + _expand((1 - a).sqrt(), latents) * noise


def diffusion_target(
    prediction_type: str,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """What the UNet must predict: eps (SD 1.x) or v = sqrt(a) eps - sqrt(1-a) x_0 (SD 2.x)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = alphas_cumprod.to(latents.device)[timesteps]
        return _expand(a.sqrt(), latents) * noise - _expand((1 - a).sqrt(), latents) * latents
    raise ValueError(
        f"unsupported prediction_type {prediction_type!r} in the scheduler config: "
        f"DreamBooth training supports {' and '.join(PREDICTION_TYPES)}"
    )


def prior_preservation_loss(
    pred: torch.Tensor, target: torch.Tensor, num_instance: int, prior_loss_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSE on rows [0, n) (instance) + weight * MSE on rows [n, 2n) (class prior).

    Returns (total, {"instance": ..., "prior": ...}). Without class rows the prior part is 0.
    """
    pred, target = pred.float(), target.float()
    instance = F.mse_loss(pred[:num_instance], target[:num_instance])
    if pred.shape[0] > num_instance:
        prior = F.mse_loss(pred[num_instance:], target[num_instance:])
    else:
        prior = instance.new_zeros(())
    return instance + prior_loss_weight * prior, {"instance": instance, "prior": prior}


def lr_lambda(step: int, warmup_steps: int, total_steps: int, schedule: str = "constant", min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up, then constant or cosine decay to `min_ratio`."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown lr_schedule {schedule!r}: choose constant or cosine")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
