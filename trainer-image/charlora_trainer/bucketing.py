"""Aspect-ratio buckets, epoch batches and caption augmentation: pure functions of the dataset and a seed.

Every sample lands in some bucket and every bucket yields its last, partial batch, so no dataset (15 images of odd
shapes at batch size 4, say) ever shrinks to zero samples.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from charlora.api.characterlora import BucketSpec


@dataclass(frozen=True)
class Bucket:
    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height


def make_buckets(resolution: int, spec: BucketSpec, *, align: int) -> list[Bucket]:
    """Bucket shapes with at most ``resolution**2`` pixels, sides multiples of ``align`` within the spec's bounds.

    ``align`` is what the UNet needs (VAE factor x its downsamplings); the spec's step is rounded up to it. The
    square ``resolution`` bucket is always present.
    """
    square = max(align, resolution // align * align)
    if not spec.enabled:
        return [Bucket(square, square)]
    step = max(align, math.ceil(spec.step / align) * align)
    low = max(align, min(spec.min_resolution, resolution) // align * align)
    high = max(square, spec.max_resolution // align * align)
    area = resolution * resolution
    shapes = {Bucket(square, square)}
    width = low
    while width <= high:
        height = min(high, area // width // align * align)
        if height >= low:
            shapes.add(Bucket(width, height))
        width += step
    return sorted(shapes, key=lambda b: (b.aspect, b.width))


def assign_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest to the image's (in log space: 2:1 and 1:2 are equally far)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.aspect) - aspect), -b.width * b.height))


def epoch_batches(
    buckets_of_items: list[Bucket], repeats: list[int], *, batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """Batches of item indices for one epoch: each item ``repeats[i]`` times, batches never mix buckets.

    Deterministic in (seed, epoch), so a resumed run replays the same order and can skip the batches it did.
    """
    rng = random.Random(f"{seed}:{epoch}")
    by_bucket: dict[Bucket, list[int]] = {}
    for index, (bucket, count) in enumerate(zip(buckets_of_items, repeats, strict=True)):
        by_bucket.setdefault(bucket, []).extend([index] * count)
    batches: list[list[int]] = []
    for bucket in sorted(by_bucket, key=lambda b: (b.width, b.height)):
        samples = by_bucket[bucket]
        rng.shuffle(samples)
        batches += [samples[start : start + batch_size] for start in range(0, len(samples), batch_size)]
    rng.shuffle(batches)
    return batches


def steps_per_epoch(buckets_of_items: list[Bucket], repeats: list[int], *, batch_size: int) -> int:
    counts: dict[Bucket, int] = {}
    for bucket, count in zip(buckets_of_items, repeats, strict=True):
        counts[bucket] = counts.get(bucket, 0) + count
    return sum(math.ceil(n / batch_size) for n in counts.values())


def augment_caption(caption: str, rng: random.Random, *, dropout_rate: float, shuffle: bool, keep_tokens: int) -> str:
    """Caption dropout (empty caption), then tag shuffling that keeps the first ``keep_tokens`` tags in place."""
    if dropout_rate > 0 and rng.random() < dropout_rate:
        return ""
    if not shuffle:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)
