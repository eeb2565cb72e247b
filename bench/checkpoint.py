"""Checkpoint cost: writing and reading the server's state each round, by buffer size.

``SampleSelection`` rewrites ``checkpoint.npz`` (model, whole buffer, records) after
every round; this measures what that costs as the buffer grows, for buffers of
5,000, 20,000 and 60,000 MNIST training images (all of it: 47 MB of pixels) and
LeNet-5. Each size is saved (written, synced, renamed) and loaded several times;
medians are reported, with the write rate in MB/s of checkpoint file.

Run from the repository root::

    python bench/checkpoint.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from flwr_select.data import SiteData, add_data_dir_option, load_mnist
from flwr_select.models import build_model
from flwr_select.selection.buffer import TrainingBuffer
from flwr_select.selection.checkpoint import CHECKPOINT, Checkpoint, latest

SIZES = (5_000, 20_000, 60_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir_option(parser)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    images, labels = load_mnist(args.data_dir)
    model = build_model("lenet5", seed=0)
    print(f"{'buffer':>8} {'file MB':>8} {'save s':>7} {'MB/s':>6} {'load s':>7}")
    for size in SIZES:
        buffer = TrainingBuffer(10, device="cpu")
        buffer.add(1, SiteData(images[:size], labels[:size], 10))
        checkpoint = Checkpoint(
            round=1,
            model_state=model.state_dict(),
            buffer=buffer,
            train_metrics={1: {"samples-received": size}},
            records={1: {"accuracy": 0.9}},
            undelivered={},
            config={"rho": 0.05},
        )
        with tempfile.TemporaryDirectory() as tmp:
            saves, loads = [], []
            for _ in range(args.reps):
                start = time.perf_counter()
                checkpoint.save(tmp)
                saves.append(time.perf_counter() - start)
                start = time.perf_counter()
                latest(tmp, device="cpu")
                loads.append(time.perf_counter() - start)
            megabytes = (Path(tmp) / CHECKPOINT).stat().st_size / 1e6
        save, load = statistics.median(saves), statistics.median(loads)
        rate = megabytes / save
        print(f"{size:>8} {megabytes:>8.1f} {save:>7.3f} {rate:>6.0f} {load:>7.3f}")


if __name__ == "__main__":
    main()
