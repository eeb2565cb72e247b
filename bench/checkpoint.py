"""Checkpoint cost per round: an append-only segment against a full rewrite.

The server checkpoints after every round. Since segments, a round writes only
the samples it accepted (one segment file) and a small manifest (model, records,
segment digests); before, it rewrote the whole buffer. This builds a synthetic
buffer of ``--samples`` 28x28 images (random pixels, 100 sites, default
1,000,000: 784 MB), already saved, and then, side by side in one run:

- a round's checkpoint: ``--new`` (default 5,000) new samples added and
  ``Checkpoint.save`` (segment + manifest, each written, synced, renamed);
- the full rewrite the same round cost before: the whole buffer in one file
  (``TrainingBuffer.save``, written, synced, renamed; the model, 0.25 MB, left
  out);
- a resume: ``latest``, reading and checking every segment.

Medians of ``--reps`` are printed, with the ratio of the full rewrite to a
round's checkpoint. Run from the repository root::

    python bench/checkpoint.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flwr_select.data import SiteData
from flwr_select.models import build_model
from flwr_select.selection.buffer import TrainingBuffer
from flwr_select.selection.checkpoint import Checkpoint, latest

SITES = 100


def uploads(
    first: int, count: int, rng: np.random.Generator
) -> list[tuple[int, SiteData]]:
    """``count`` new samples (ids from ``first``), split over the sites."""
    images = torch.from_numpy(rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, 10, count))
    ids = torch.arange(first, first + count)
    sites = np.arange(count) % SITES
    return [
        (site, SiteData(images[rows], labels[rows], 10, ids=ids[rows]))
        for site in range(SITES)
        if len(rows := torch.from_numpy(np.flatnonzero(sites == site)))
    ]


def clocked(action) -> float:
    """Seconds ``action()`` took."""
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--new", type=int, default=5_000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    model = build_model("lenet5", seed=0)
    buffer = TrainingBuffer(10, device="cpu")
    for site, samples in uploads(0, args.samples, rng):
        buffer.add(site, samples)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        checkpoint = Checkpoint(0, model.state_dict(), buffer, {}, {}, {}, {})
        checkpoint.save(tmp)
        rounds, fulls = [], []
        for rep in range(args.reps):
            first = args.samples + rep * args.new
            for site, samples in uploads(first, args.new, rng):
                buffer.add(site, samples)
            checkpoint.round += 1
            checkpoint.records[checkpoint.round] = {"accuracy": 0.99}
            rounds.append(clocked(lambda: checkpoint.save(tmp)))
            full = Path(tmp) / "full.npz"
            fulls.append(clocked(lambda: buffer.save(full)))  # noqa: B023
            full.unlink()
        resume = clocked(lambda: latest(tmp, device="cpu"))
        segment = sorted((Path(tmp) / "segments").iterdir())[-1].stat().st_size
    one_round, rewrite = statistics.median(rounds), statistics.median(fulls)
    print(
        f"buffer: {len(buffer):,} samples ({buffer.nbytes / 1e6:.0f} MB), "
        f"{args.new:,} new per round, {args.reps} rounds"
    )
    print(
        f"round checkpoint (segment {segment / 1e6:.1f} MB + manifest): "
        f"{one_round:.3f} s"
    )
    print(f"full rewrite of the buffer (before segments):      {rewrite:.3f} s")
    print(
        f"full rewrite / round checkpoint:                   {rewrite / one_round:.0f}x"
    )
    print(
        f"resume (read and check {len(checkpoint.segments)} segments): {resume:.2f} s"
    )


if __name__ == "__main__":
    main()
