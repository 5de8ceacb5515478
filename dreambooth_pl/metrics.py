"""DreamBooth evaluation metrics over embeddings and distances, as torchmetrics `Metric`s.

Every metric keeps a float64 sum and an int64 count, both reduced with "sum", so DDP ranks (or
`merge_state`) combine into the exact global mean however unevenly the data is split; averaging
per-rank means would weight small shards too much. Nothing here loads a model: feed it embeddings
from `dreambooth_pl.encoders`. `compute()` on a metric that saw no pairs returns nan (numpy's mean of
nothing) rather than raising, so an empty evaluation logs nan instead of stopping training.
"""

from __future__ import annotations

from itertools import combinations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric


def _unit(x: Tensor, name: str) -> Tensor:
    # Callers may pass raw features: normalise here, in float64 so sums over many pairs stay exact.
    if not isinstance(x, Tensor) or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be an (N, D) tensor of embeddings, got {shape}")
    return F.normalize(x.detach().double(), dim=-1)  # (N, D) unit vectors; an all-zero row stays zero


def _same_dim(a: Tensor, b: Tensor, names: str) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{names} have dimensions {a.shape[-1]} and {b.shape[-1]}: embed both with the same encoder")


class _SumCount(Metric):
    """Mean as sum / count; both states sum-reduced, so DDP and `merge_state` are exact."""

    is_differentiable = False
    higher_is_better: bool | None = True
    full_state_update = False

    total: Tensor
    count: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def _accumulate(self, total: Tensor, count: int) -> None:
        self.total += total.to(device=self.total.device, dtype=torch.float64)
        self.count += count

    def compute(self) -> Tensor:
        """The mean over everything seen (all ranks after sync); nan when nothing was seen."""
        if int(self.count) == 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.total.device)
        return self.total / self.count


class PairwiseCosine(_SumCount):
    """Mean cosine over all (real, generated) pairs: DINO, CLIP-I, PRES and the real-vs-real reference."""

    def update(self, real: Tensor, generated: Tensor, exclude_self: bool = False) -> None:
        """Add the N x M cosines of `real` (N, D) vs `generated` (M, D).

        `exclude_self=True` scores a set against itself (pass the same tensor twice) without the N
        self-pairs, N x (N - 1) pairs.
        """
        r, g = _unit(real, "real"), _unit(generated, "generated")
        _same_dim(r, g, "real and generated")
        sims = r @ g.T  # (N, M) cosines
        if not exclude_self:
            self._accumulate(sims.sum(), sims.numel())
            return
        if real.shape != generated.shape or not torch.equal(real, generated):
            got = (f"shapes {tuple(real.shape)} and {tuple(generated.shape)}" if real.shape != generated.shape
                   else f"two different {tuple(real.shape)} tensors")
            raise ValueError(f"exclude_self=True drops the self-pairs of one set, so real and generated must be the same "
                             f"embeddings, got {got}: pass the set twice, or exclude_self=False for two sets")
        n = r.shape[0]
        self._accumulate(sims.sum() - sims.diagonal().sum(), n * (n - 1))


class PairedCosine(_SumCount):
    """Mean of cos(a_i, b_i) over aligned pairs: CLIP-T with (prompt, image) embeddings."""

    def update(self, a: Tensor, b: Tensor) -> None:
        """Add the N cosines of the rows of `a` (N, D) and `b` (N, D)."""
        ua, ub = _unit(a, "a"), _unit(b, "b")
        if ua.shape != ub.shape:
            raise ValueError(f"PairedCosine pairs a[i] with b[i]: got shapes {tuple(a.shape)} and {tuple(b.shape)}; "
                             f"pass one text embedding per image (repeat the prompt's row for each of its images)")
        self._accumulate((ua * ub).sum(), ua.shape[0])


class MeanValue(_SumCount):
    """Mean of scalar values, e.g. DIV as the mean LPIPS distance of within-prompt image pairs."""

    higher_is_better = None  # depends on what is averaged (for DIV, LPIPS: higher = more diverse)

    def update(self, values: Tensor) -> None:
        """Add `values` (K,) (a 0-d tensor or a Python number counts as one value)."""
        v = torch.as_tensor(values).detach()
        if v.ndim > 1:
            raise ValueError(f"MeanValue takes a (K,) tensor of values, got shape {tuple(v.shape)}: flatten it first")
        v = v.reshape(-1).double()
        self._accumulate(v.sum(), v.numel())


def within_group_pairs(n: int) -> list[tuple[int, int]]:
    """The n (n - 1) / 2 distinct unordered index pairs (i, j), i < j, of a group of n images."""
    if n < 0:
        raise ValueError(f"a group has n >= 0 images, got n={n}")
    return list(combinations(range(n), 2))


def directional_similarity(img_src: Tensor, img_edit: Tensor, txt_src: Tensor, txt_edit: Tensor) -> Tensor:
    """(N,) float64 cos(E_I(edit) - E_I(src), E_T(edit caption) - E_T(src caption)) (InstructPix2Pix).

    Each embedding is L2-normalised before the differences, as CLIP embeddings are; a zero
    direction (the edit left the image unchanged) gives 0.
    """
    names = ("img_src", "img_edit", "txt_src", "txt_edit")
    units = [_unit(x, name) for x, name in zip((img_src, img_edit, txt_src, txt_edit), names, strict=True)]
    if len({u.shape for u in units}) != 1:
        shapes = ", ".join(f"{name} {tuple(x.shape)}" for x, name in zip((img_src, img_edit, txt_src, txt_edit), names, strict=True))
        raise ValueError(f"directional similarity needs four (N, D) tensors of one shape, got {shapes}")
    i_src, i_edit, t_src, t_edit = units
    return F.cosine_similarity(i_edit - i_src, t_edit - t_src, dim=-1)  # (N,)


class DirectionalSimilarity(_SumCount):
    """Mean CLIP directional similarity of (source, edited) image pairs and their captions."""

    def update(self, img_src: Tensor, img_edit: Tensor, txt_src: Tensor, txt_edit: Tensor) -> None:
        """Add the N directional similarities; all four inputs are (N, D)."""
        sims = directional_similarity(img_src, img_edit, txt_src, txt_edit)
        self._accumulate(sims.sum(), sims.numel())
