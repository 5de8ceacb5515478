"""Tests for dreambooth_pl.buckets: bucket sizes, nearest bucket, fitting images, the bucket batch sampler."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from dreambooth_pl.buckets import (
    ASPECT_TOLERANCE,
    BucketBatchSampler,
    aspect_error,
    fit_to_bucket,
    make_buckets,
    nearest_bucket,
)

SDXL_1024 = [
    (704, 1408), (768, 1344), (768, 1280), (832, 1216), (896, 1152), (960, 1088), (1024, 1024),
    (1088, 960), (1152, 896), (1216, 832), (1280, 768), (1344, 768), (1408, 704),
]
SETTINGS = [(1024, 64), (512, 64), (64, 8)]

# ------------------------------------------------------------------------------------------ make_buckets


@pytest.mark.parametrize("resolution, step", SETTINGS)
def test_buckets_obey_area_grid_ratio_and_order(resolution, step):
    """Area within budget, sides on the step grid, ratios within max_ratio, square included, sorted by w/h."""
    buckets = make_buckets(resolution, step)
    assert len(buckets) == len(set(buckets)) >= 5
    assert (resolution, resolution) in buckets
    for w, h in buckets:
        assert w * h <= resolution**2
        assert w % step == 0 and h % step == 0
        assert max(w, h) / min(w, h) <= 2.0
        # Kohya: the tallest height on the grid for this width or, for a transposed bucket, this height.
        assert (h + step) * w > resolution**2 or (w + step) * h > resolution**2
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)
    assert sorted((h, w) for w, h in buckets) == sorted(buckets)  # portrait and landscape alike


def test_buckets_1024_are_the_sdxl_set():
    """1024 / 64 gives the familiar SDXL sizes, exactly."""
    buckets = make_buckets(1024, 64)
    for b in [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
              (1408, 704), (704, 1408)]:
        assert b in buckets
    assert buckets == SDXL_1024


def test_buckets_small_settings_concrete():
    """512 / 64 and the tiny models' 64 / 8 (the same shapes scaled by 1/8)."""
    assert make_buckets(512, 64) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    assert make_buckets(64, 8) == [(48, 80), (56, 72), (64, 64), (72, 56), (80, 48)]


def test_max_ratio_filters_buckets():
    """A tighter max_ratio keeps only the squarer buckets; 1 keeps only the square."""
    assert make_buckets(1024, 64, max_ratio=1.0) == [(1024, 1024)]
    tight = make_buckets(1024, 64, max_ratio=1.5)
    assert all(max(w, h) / min(w, h) <= 1.5 for w, h in tight)
    assert (1216, 832) in tight and (1344, 768) not in tight


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(resolution=512, step=60), "data.bucket_step"),
        (dict(resolution=512, step=0), "data.bucket_step"),
        (dict(resolution=500, step=64), "data.resolution"),
        (dict(resolution=32, step=64), "data.resolution"),
        (dict(resolution=512, step=64, max_ratio=0.5), "data.max_aspect_ratio"),
    ],
)
def test_make_buckets_errors_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        make_buckets(**kwargs)


# ------------------------------------------------------------------------------- nearest_bucket / error


def sweep_ratios(n: int = 2001) -> list[float]:
    """Aspect ratios w/h from 1:2 to 2:1, uniform in log space, both ends included."""
    return [math.exp(math.log(2) * (2 * k / (n - 1) - 1)) for k in range(n)]


@pytest.mark.parametrize("resolution, step", SETTINGS)
def test_every_ratio_within_tolerance_of_its_bucket(resolution, step):
    """Dense 1:2 .. 2:1 sweep: the nearest bucket is within ASPECT_TOLERANCE and truly the nearest."""
    buckets = make_buckets(resolution, step)
    worst = 0.0
    for r in sweep_ratios():
        w, h = (round(1000 * r), 1000) if r >= 1 else (1000, round(1000 / r))
        i = nearest_bucket(w, h, buckets)
        err = aspect_error(w, h, buckets[i])
        assert err == pytest.approx(min(aspect_error(w, h, b) for b in buckets))
        worst = max(worst, err)
    assert worst <= ASPECT_TOLERANCE
    # The bound is tight to the derivation: 2:1 -> 5:3 at 512 (log 1.2), half of the widest gap at 1024.
    expected = {1024: 0.0668, 512: math.log(1.2), 64: math.log(1.2)}[resolution]
    assert worst == pytest.approx(expected, abs=2e-3)


def test_nearest_bucket_and_aspect_error_values():
    buckets = make_buckets(1024, 64)
    assert buckets[nearest_bucket(4000, 4000, buckets)] == (1024, 1024)
    assert buckets[nearest_bucket(3000, 2000, buckets)] == (1216, 832)  # 1.5 vs 1.4615
    assert buckets[nearest_bucket(2000, 3000, buckets)] == (832, 1216)
    assert buckets[nearest_bucket(5000, 1000, buckets)] == (1408, 704)  # beyond max_ratio: the extreme one
    assert aspect_error(300, 200, (1216, 832)) == pytest.approx(abs(math.log(1.5) - math.log(1216 / 832)))
    assert aspect_error(100, 100, (64, 64)) == 0.0
    with pytest.raises(ValueError, match="data.bucket_step"):
        nearest_bucket(10, 10, [])
    with pytest.raises(ValueError, match="0x10"):
        aspect_error(0, 10, (64, 64))


# ----------------------------------------------------------------------------------------- fit_to_bucket


def checkerboard(h: int, w: int, cell: int) -> torch.Tensor:
    """(3, h, w) uint8 checkerboard of square cell x cell cells."""
    ys = torch.arange(h).div(cell, rounding_mode="floor")[:, None]
    xs = torch.arange(w).div(cell, rounding_mode="floor")[None, :]
    board = ((ys + xs) % 2).to(torch.uint8) * 255
    return board.expand(3, h, w).contiguous()


def median_run(line: torch.Tensor) -> float:
    """Median length of the interior constant runs of a thresholded 1-D profile (the cell size in px)."""
    bits = (line > 127).int()
    edges = torch.nonzero(bits[1:] != bits[:-1]).flatten()
    return float(edges.diff().float().median())


@pytest.mark.parametrize(
    "size, bucket, cell, resized",
    [
        ((200, 400), (64, 64), 25, (64, 128)),  # (H, W); height binding, width overhangs
        ((300, 150), (64, 96), 30, (128, 64)),  # width binding, height overhangs
    ],
)
def test_fit_covers_without_stretch(size, bucket, cell, resized):
    """Shape is the bucket; checkerboard cells stay square (one scale for both sides); centred offsets."""
    h, w = size
    bw, bh = bucket
    out, original, (top, left) = fit_to_bucket(checkerboard(h, w, cell), bucket)
    assert out.shape == (3, bh, bw) and out.dtype == torch.uint8
    assert original == (h, w)
    assert (top, left) == ((resized[0] - bh) // 2, (resized[1] - bw) // 2)
    scale = max(bw / w, bh / h)
    across = median_run(out[0, bh // 2, :])
    down = median_run(out[0, :, bw // 2])
    assert across == pytest.approx(cell * scale, abs=1) and down == pytest.approx(cell * scale, abs=1)


def test_fit_offsets_index_the_resized_image():
    """crop_top_left is in the resized image's pixels: cropping the resize there gives the output."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 90, 160, generator=g)  # float input
    bucket = (48, 80)  # (bw, bh): scale 80/90 -> resized (80, 142)
    resized = TF.resize(x, [80, 142], interpolation=InterpolationMode.BILINEAR, antialias=True)
    for seed in range(5):
        out, original, (top, left) = fit_to_bucket(x, bucket, center=False,
                                                   generator=torch.Generator().manual_seed(seed))
        assert original == (90, 160) and out.shape == (3, 80, 48) and out.dtype == torch.float32
        assert top == 0 and 0 <= left <= 142 - 48
        torch.testing.assert_close(out, resized[:, top : top + 80, left : left + 48])


def test_fit_exact_size_is_untouched():
    """An image already the bucket's size comes back unchanged (no resize blur), offsets zero."""
    x = torch.randint(0, 256, (3, 72, 56), dtype=torch.uint8)
    out, original, offsets = fit_to_bucket(x, (56, 72), center=False)
    assert torch.equal(out, x) and original == (72, 56) and offsets == (0, 0)


def test_random_crop_reproducible_and_seed_dependent():
    """Same seed -> same crop (generator or global RNG); different seeds -> different crops."""
    x = checkerboard(64, 640, 7)  # 10:1, resized (64, 640) -> 576 px of horizontal slack

    def crop(seed: int) -> tuple[int, int]:
        return fit_to_bucket(x, (64, 64), center=False, generator=torch.Generator().manual_seed(seed))[2]

    assert crop(1) == crop(1)
    assert len({crop(s) for s in range(8)}) > 1
    torch.manual_seed(3)
    a = fit_to_bucket(x, (64, 64), center=False)[2]
    torch.manual_seed(3)
    assert fit_to_bucket(x, (64, 64), center=False)[2] == a


def test_fit_rejects_non_image():
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        fit_to_bucket(torch.zeros(64, 64), (64, 64))


# ------------------------------------------------------------------------------------ BucketBatchSampler

# 23 items over 4 buckets of sizes 7, 5, 9, 2 (non-contiguous ids, interleaved).
BUCKET_OF = [3, 0, 7, 3, 0, 3, 7, 1, 3, 0, 7, 3, 0, 3, 7, 7, 3, 0, 7, 7, 7, 7, 1]


def test_bucket_of_fixture():
    assert {b: BUCKET_OF.count(b) for b in set(BUCKET_OF)} == {3: 7, 0: 5, 7: 9, 1: 2}


def epoch(sampler: BucketBatchSampler, e: int = 0) -> list[list[int]]:
    sampler.set_epoch(e)
    return list(sampler)


def test_sampler_single_bucket_batches_each_item_once():
    s = BucketBatchSampler(BUCKET_OF, batch_size=3, seed=0)
    batches = epoch(s)
    assert len(batches) == len(s) == 3 + 2 + 3 + 1  # ceil per bucket
    for b in batches:
        assert 1 <= len(b) <= 3 and len({BUCKET_OF[i] for i in b}) == 1
    assert sorted(i for b in batches for i in b) == list(range(len(BUCKET_OF)))


def test_sampler_deterministic_and_epoch_dependent():
    a, b = BucketBatchSampler(BUCKET_OF, 2, seed=5), BucketBatchSampler(BUCKET_OF, 2, seed=5)
    assert epoch(a, 0) == epoch(b, 0) and epoch(a, 1) == epoch(b, 1)
    assert epoch(a, 0) != epoch(a, 1)
    assert epoch(a, 0) != epoch(BucketBatchSampler(BUCKET_OF, 2, seed=6), 0)
    # Shuffled across buckets: the bucket sequence is not just grouped in sorted order.
    order = [BUCKET_OF[bt[0]] for bt in epoch(a, 0)]
    assert order != sorted(order)
    # Shuffled within buckets: which items share a batch changes between epochs.
    assert {frozenset(bt) for bt in epoch(a, 0)} != {frozenset(bt) for bt in epoch(a, 1)}


def test_sampler_no_shuffle_is_sorted():
    batches = epoch(BucketBatchSampler(BUCKET_OF, 4, shuffle=False), 3)
    assert batches[0] == [1, 4, 9, 12] and batches[1] == [17]  # bucket 0, ascending indices
    assert [i for b in batches for i in b] == sorted(range(23), key=lambda i: (BUCKET_OF[i], i))


def test_sampler_drop_last_drops_partial_batches():
    s = BucketBatchSampler(BUCKET_OF, 3, drop_last=True)
    batches = epoch(s)
    assert len(batches) == len(s) == 2 + 1 + 3 + 0
    assert all(len(b) == 3 for b in batches)
    assert len({i for b in batches for i in b}) == 18


@pytest.mark.parametrize("batch_size", [3, 4])  # 9 global batches (padded), 8 (not)
def test_sampler_ddp_ranks_disjoint_and_equal(batch_size):
    """2 ranks: same length; without padding disjoint and covering; with padding still covering."""
    ranks = [BucketBatchSampler(BUCKET_OF, batch_size, seed=1, num_replicas=2, rank=r) for r in range(2)]
    per_rank = [epoch(s, 2) for s in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0]) == len(ranks[1])
    global_batches = ranks[0].global_batches()
    flat = [tuple(b) for r in per_rank for b in r]
    assert {i for b in flat for i in b} == set(range(23))
    if len(global_batches) % 2 == 0:
        assert set(map(tuple, per_rank[0])).isdisjoint(map(tuple, per_rank[1]))
        assert sorted(flat) == sorted(map(tuple, global_batches))
    else:  # one batch repeated to even the ranks out
        assert len(flat) == len(global_batches) + 1
    for b in flat:
        assert len({BUCKET_OF[i] for i in b}) == 1


def test_sampler_ddp_padding_case_is_exercised():
    """batch_size 3 gives 9 global batches (odd): rank 1 gets a repeat so both run 5 steps."""
    s = BucketBatchSampler(BUCKET_OF, 3, num_replicas=2, rank=1)
    assert len(s.global_batches()) == 9 and len(s) == 5 == len(list(s))
    # drop_last trims instead: batch_size 5 has 3 full batches (9, 7, 5 items) -> 1 per rank, not 2.
    for rank in range(2):
        s = BucketBatchSampler(BUCKET_OF, 5, num_replicas=2, rank=rank, drop_last=True)
        assert len(s.global_batches()) == 3 and len(s) == 1 == len(list(s))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bucket_of=[], batch_size=1), "empty"),
        (dict(bucket_of=[0], batch_size=0), "data.batch_size"),
        (dict(bucket_of=[0], batch_size=1, num_replicas=2, rank=2), "rank=2"),
        (dict(bucket_of=[0], batch_size=1, rank=-1), "rank=-1"),
        (dict(bucket_of=[0, 1], batch_size=2, drop_last=True), "data.batch_size"),
    ],
)
def test_sampler_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BucketBatchSampler(**kwargs)
