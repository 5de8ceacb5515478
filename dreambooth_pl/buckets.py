"""Kohya-style aspect-ratio buckets: bucket sizes, image fitting and a one-bucket-per-batch sampler."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torchvision.transforms.functional as TF
from torch.utils.data import Sampler
from torchvision.transforms import InterpolationMode

# Bound on aspect_error(w, h, buckets[nearest_bucket(w, h, buckets)]) for any image with
# max(w, h) / min(w, h) <= max_ratio = 2, at the default step 64 and resolution 512 or 1024 (and at 64 / step 8,
# the same set scaled down): <= 0.2 in log ratio, i.e. at most ~18% of one side cropped (1 - e^-0.2).
# Derived as max(half the largest log-ratio gap between neighbouring buckets, gap from the extreme buckets to
# log(max_ratio)):
#   1024/64: 13 buckets from 704x1408 to 1408x704; largest half gap 0.067 (1344x768 .. 1408x704), edge 0.
#   512/64:  5 buckets from 384x640 to 640x384; half gap 0.130, edge log(2 / (5/3)) = 0.182 <- binding case
#            (no 512-area bucket lies between 5:3 and 2:1: 320 wide gives 320x768 = 2.4:1, over max_ratio).
ASPECT_TOLERANCE = 0.2

# The VAE downsamples 8x, so bucket sides must be multiples of 8 for whole latents.
LATENT_FACTOR = 8


def make_buckets(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Bucket sizes (width, height) of area <= resolution**2, sides multiples of step, sorted by w / h."""
    if step < 1 or step % LATENT_FACTOR:
        raise ValueError(
            f"data.bucket_step={step} is not a positive multiple of {LATENT_FACTOR} (latents are 1/8 of the "
            f"image): set data.bucket_step to e.g. 64"
        )
    if resolution < step or resolution % step:
        fix = max(step, round(resolution / step) * step)
        raise ValueError(
            f"data.resolution={resolution} is not a positive multiple of data.bucket_step={step}: "
            f"set data.resolution to e.g. {fix} or change data.bucket_step"
        )
    if not max_ratio >= 1:  # `not >=` also refuses NaN
        raise ValueError(
            f"data.max_aspect_ratio={max_ratio} is below 1 (it is longer side / shorter side): "
            f"set data.max_aspect_ratio to e.g. 2.0"
        )
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    # Kohya: for each width, the tallest height on the step grid that keeps the area within budget; each
    # bucket is added with its transpose so portrait and landscape images get the same set of shapes.
    for w in range(step, area // step + 1, step):
        h = (area // w) // step * step
        if h < step:
            break
        if max(w, h) / min(w, h) <= max_ratio:
            buckets.update({(w, h), (h, w)})
    return sorted(buckets, key=lambda b: (b[0] / b[1], b[0]))


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} (width x height) is empty: drop or replace that image")


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest to width / height in log space (first on ties)."""
    if not buckets:
        raise ValueError(
            "buckets is empty: build them with make_buckets(data.resolution, data.bucket_step, "
            "data.max_aspect_ratio)"
        )
    errors = [aspect_error(width, height, b) for b in buckets]
    return min(range(len(buckets)), key=errors.__getitem__)


def aspect_error(width: int, height: int, bucket: tuple[int, int]) -> float:
    """|log(width / height) - log(bw / bh)|: the aspect-ratio change that fitting to bucket costs."""
    _check_size(width, height)
    bw, bh = bucket
    _check_size(bw, bh)
    return abs(math.log(width / height) - math.log(bw / bh))


def fit_to_bucket(
    x: torch.Tensor,
    bucket: tuple[int, int],
    center: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize x (C, H, W) to cover bucket (bw, bh) without stretching, crop; (image, (H, W), (top, left))."""
    if x.ndim != 3:
        raise ValueError(f"expected an image of shape (C, H, W), got shape {tuple(x.shape)}: pass one image")
    bw, bh = bucket
    _check_size(bw, bh)
    h, w = x.shape[-2:]
    _check_size(w, h)
    # One scale for both sides (no stretch), the smallest that covers the bucket; the binding side lands on
    # the bucket exactly, the other overhangs and is cropped. max() guards float rounding below the bucket.
    scale = max(bw / w, bh / h)
    rh, rw = max(bh, round(h * scale)), max(bw, round(w * scale))
    if (rh, rw) != (h, w):  # already the right size: skip the resize, which would only blur
        x = TF.resize(x, [rh, rw], interpolation=InterpolationMode.BILINEAR, antialias=True)  # (C, rh, rw)
    if center:
        top, left = (rh - bh) // 2, (rw - bw) // 2
    else:
        # torch RNG (not python random) so seed_everything / a seeded generator reproduce the crop.
        top = int(torch.randint(0, rh - bh + 1, (1,), generator=generator).item())
        left = int(torch.randint(0, rw - bw + 1, (1,), generator=generator).item())
    # SDXL's add_time_ids take exactly these: original_size (H, W), crops_coords_top_left in resized pixels.
    return x[:, top : top + bh, left : left + bw], (int(h), int(w)), (top, left)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, each from a single bucket; shuffled per epoch, split across DDP ranks."""

    def __init__(
        self,
        bucket_of: list[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        """bucket_of[i] = bucket index of dataset item i."""
        super().__init__()
        if len(bucket_of) == 0:
            raise ValueError("bucket_of is empty (no training images): check the instance image directory")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1: set data.batch_size to e.g. 1")
        if num_replicas < 1:
            raise ValueError(f"num_replicas={num_replicas} must be >= 1: pass the DDP world size")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} is outside [0, {num_replicas}): pass this process's global rank")
        self.bucket_of = [int(b) for b in bucket_of]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        # bucket id -> dataset indices, ascending; iteration order of buckets is sorted so it is reproducible.
        self.members: dict[int, list[int]] = {}
        for i, b in enumerate(self.bucket_of):
            self.members.setdefault(b, []).append(i)
        per_bucket = [len(m) // batch_size if drop_last else -(-len(m) // batch_size) for m in self.members.values()]
        self.num_global_batches = sum(per_bucket)
        if len(self) == 0:
            raise ValueError(
                f"no batches: with drop_last every bucket needs >= batch_size={batch_size} items and there must "
                f"be >= num_replicas={num_replicas} full batches ({self.num_global_batches} here); lower "
                f"data.batch_size or set drop_last=False"
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order __iter__ yields (call before each epoch, as with DistributedSampler)."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        n, r = self.num_global_batches, self.num_replicas
        # Like DistributedSampler: drop_last trims the global order to a multiple of the world size,
        # otherwise it is padded up to one by repeating batches.
        return n // r if self.drop_last else -(-n // r)

    def global_batches(self) -> list[list[int]]:
        """The epoch's batches over all ranks, before padding/trimming and the per-rank split."""
        # Seeded by seed + epoch (DistributedSampler's convention): every rank builds the same global order.
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        batches: list[list[int]] = []
        for b in sorted(self.members):
            idx = self.members[b]
            if self.shuffle:
                idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            stop = len(idx) - len(idx) % self.batch_size if self.drop_last else len(idx)
            batches.extend(idx[k : k + self.batch_size] for k in range(0, stop, self.batch_size))
        if self.shuffle:
            batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's batches: every num_replicas-th batch of the global order, from index rank."""
        batches = self.global_batches()
        total = len(self) * self.num_replicas
        # Pad by cycling from the start (a batch may repeat on another rank) or trim; equal steps on all ranks.
        batches = [batches[k % len(batches)] for k in range(total)]
        yield from (list(b) for b in batches[self.rank : total : self.num_replicas])
