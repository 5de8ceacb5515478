"""Diffusion training math as pure functions: noising, targets, the prior-preservation loss."""

from __future__ import annotations

import torch

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
    pred: torch.Tensor,
    target: torch.Tensor,
    num_instance: int,
    prior_loss_weight: float = 1.0,
    sample_weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSE on rows [0, n) (instance) + weight * MSE on rows [n, N) (class prior).

    `sample_weights` (N,) scales each row's MSE (min-SNR, flow weighting); None weighs rows equally. `mask`
    (n, 1, h, w) in [0, 1] weights the instance rows' pixels (a photo's mask at latent size): each such row's MSE is
    the mask-weighted mean, so a masked photo counts as much as an unmasked one.
    Returns (total, {"instance": ..., "prior": ...}). Without class rows the prior part is 0.
    """
    pred, target = pred.float(), target.float()
    err = (pred - target).pow(2)  # (N, C, h, w)
    per_row = err.flatten(1).mean(1)  # (N,) mean over C, h, w
    if mask is not None:
        m = mask.float().expand(-1, err.shape[1], -1, -1)  # (n, C, h, w)
        per_row = torch.cat([(err[:num_instance] * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1e-6),
                             per_row[num_instance:]])
    if sample_weights is not None:
        per_row = per_row * sample_weights.float()
    instance = per_row[:num_instance].mean()
    prior = per_row[num_instance:].mean() if pred.shape[0] > num_instance else instance.new_zeros(())
    return instance + prior_loss_weight * prior, {"instance": instance, "prior": prior}


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a_t / (1 - a_t) per timestep, (B,)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1 - a)


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for eps, / (SNR + 1) for v."""
    s = snr(timesteps, alphas_cumprod)
    clipped = torch.clamp(s, max=gamma)
    if prediction_type == "epsilon":
        return clipped / s
    if prediction_type == "v_prediction":
        return clipped / (s + 1)
    raise ValueError(f"min-SNR weighting supports epsilon and v_prediction, not {prediction_type!r}")


def fixed_draws(seeds: list[int], shape: tuple[int, ...], draws: int, num_train_timesteps: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and timesteps that depend only on each row's seed: ((K, N, *shape) noise, (K, N) timesteps).

    Row i's K draws come from its own CPU generator seeded with seeds[i], so a validation loss sees the same noise
    every time, whatever the batch a row lands in, the rank that scores it or the run's seed."""
    noise, timesteps = [], []
    for seed in seeds:
        g = torch.Generator("cpu").manual_seed(int(seed))
        noise.append(torch.stack([torch.randn(shape, generator=g) for _ in range(draws)]))  # (K, *shape)
        timesteps.append(torch.randint(0, num_train_timesteps, (draws,), generator=g))  # (K,)
    return torch.stack(noise, dim=1), torch.stack(timesteps, dim=1)


def offset_noise(noise: torch.Tensor, offset: float, extra: torch.Tensor) -> torch.Tensor:
    """Offset noise: eps + offset * per-(sample, channel) constant, `extra` (B, C, 1, 1) standard normal."""
    return noise + offset * extra



# ------------------------------------------------------------------------------------------------ flow matching
# SD3 / Flux train a rectified flow: x_t = (1 - sigma) x_0 + sigma eps, and the model predicts the velocity eps - x_0.
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


def flow_noised(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x_0 + sigma eps; latents/noise (B, C, h, w), sigmas (B,) in [0, 1]."""
    s = _expand(sigmas, latents)
    return (1 - s) * latents + s * noise


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity a rectified-flow model predicts: eps - x_0."""
    return noise - latents


def timestep_density(scheme: str, n: int, generator: torch.Generator | None = None, logit_mean: float = 0.0,
                     logit_std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """(n,) u in [0, 1) that picks each row's place in the training noise table (SD3's recipe): logit-normal,
    "mode" (more weight mid-way), else uniform."""
    if scheme == "logit_normal":
        u = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator))
    elif scheme == "mode":
        u = torch.rand(n, generator=generator)
        u = 1 - u - mode_scale * (torch.cos(torch.pi * u / 2) ** 2 - 1 + u)
    else:
        u = torch.rand(n, generator=generator)
    return u.clamp(0, 1 - 1e-6)  # u = 1 would index past the table


def flow_loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """(B,) per-row loss weights: sigma^-2 (sigma_sqrt), the cosine map (cosmap), else 1 (logit_normal and mode shape
    the sampling of sigma instead)."""
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (torch.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
    return torch.ones_like(sigmas, dtype=torch.float32)
