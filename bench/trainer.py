"""Central training throughput: ``train`` against a bare loop and a DataLoader.

The server trains on its whole buffer every round, so ``flwr_select.trainer.
train`` is the hottest loop of a run. Measured in samples/second for one epoch
of the MNIST recipe's work (``TrainConfig(epochs=1, batch_size=64,
optimizer="adam", lr=2e-3, schedule="cosine", warmup=0.3,
augment="translate")``, seed 0) of LeNet-5 (``build_model("lenet5", seed=0)``)
over the first 10,000 MNIST training images, kept ``uint8`` on ``--device`` as
the training buffer keeps them, against

(a) a bare PyTorch loop doing the same work over the same tensors:
    ``torch.randperm`` batches, each shifted by ``translate``, the rate of each
    step set by hand, ``model(x)``, ``cross_entropy``, ``backward``, ``step``
    and nothing else (no loss bookkeeping) -- the floor any trainer can reach;
(b) ``DataLoader(TensorDataset(images, labels), batch_size=64, shuffle=True)``
    with the same loop body -- the idiomatic PyTorch way, which indexes and
    collates sample by sample in Python.

Every run of every variant trains its own copy of one freshly built model (the
same starting weights each time) with its own new optimizer, so all variants do
the same arithmetic; building the copy is not timed, making the optimizer is
(``train`` makes its own). On CUDA the clock stops after a synchronize. The
targets: ``train`` within 5% of the bare loop (ratio >= 0.95), and at least
1.5x the DataLoader's throughput.

The machine is shared and noisy, so the variants run once each to warm up,
then interleaved, the order rotated every repetition (trainer, bare,
dataloader; bare, dataloader, trainer; ...), and the median time per variant is
compared. The median of the per-repetition ratios is printed as well. Runs stop
after ``--reps`` repetitions or once ``--budget`` seconds have passed (at least
5 repetitions). torch's default thread count is used unless ``--threads`` says
otherwise.

Run from the repository root::

    python bench/trainer.py --data-dir ../shared/data/mnist
    python bench/trainer.py --data-dir DIR --device cpu --threads 1

``--data-dir`` defaults to the environment variable FLWR_SELECT_DATA_DIR.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from flwr_select.data import add_data_dir_option, load_mnist
from flwr_select.models import build_model
from flwr_select.trainer import TrainConfig, train, translate

NUM_IMAGES, BATCH_SIZE, SEED = 10_000, 64, 0
CONFIG = TrainConfig(
    epochs=1,
    batch_size=BATCH_SIZE,
    optimizer="adam",
    lr=2e-3,
    schedule="cosine",
    warmup=0.3,
    augment="translate",
)
"""The work every variant does: the MNIST recipe's, for one epoch."""
TARGETS = {"bare": 0.95, "dataloader": 1.5}  # trainer's throughput over each


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir_option(parser)
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the buffer and model live (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's own choice)",
    )
    parser.add_argument(
        "--reps", type=int, default=15, help="most timed runs per variant"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=40.0,
        help="stop after this many seconds of timing (once 5 runs are done)",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(SEED)

    all_images, all_labels = load_mnist(args.data_dir, "train")
    images = all_images[:NUM_IMAGES].to(device)
    labels = all_labels[:NUM_IMAGES].to(device)
    initial = build_model("lenet5", seed=SEED).to(device)
    loader = DataLoader(
        TensorDataset(images, labels), batch_size=BATCH_SIZE, shuffle=True
    )

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    total = -(-NUM_IMAGES // BATCH_SIZE)  # steps of one epoch
    rates = [CONFIG.lr_at(step, total) for step in range(total)]

    def step(
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        number: int,
        x: Tensor,
        y: Tensor,
        generator: torch.Generator,
    ) -> None:
        optimizer.param_groups[0]["lr"] = rates[number]
        optimizer.zero_grad(set_to_none=True)
        x = translate(x, CONFIG.max_shift, generator)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    def adam(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=CONFIG.lr)

    def run_trainer(model: nn.Module) -> None:
        train(model, images, labels, CONFIG, seed=SEED)

    def run_bare(model: nn.Module) -> None:
        optimizer, generator = adam(model), torch.Generator(device).manual_seed(SEED)
        model.train()
        batches = torch.randperm(NUM_IMAGES, device=device).split(BATCH_SIZE)
        for number, idx in enumerate(batches):
            step(model, optimizer, number, images[idx], labels[idx], generator)

    def run_dataloader(model: nn.Module) -> None:
        optimizer, generator = adam(model), torch.Generator(device).manual_seed(SEED)
        model.train()
        for number, (x, y) in enumerate(loader):
            step(model, optimizer, number, x, y, generator)

    variants: dict[str, Callable[[nn.Module], None]] = {
        "trainer": run_trainer,
        "bare": run_bare,
        "dataloader": run_dataloader,
    }

    def timed(fn: Callable[[nn.Module], None]) -> float:
        model = copy.deepcopy(initial)
        sync()
        start = time.perf_counter()
        fn(model)
        sync()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up: allocator, kernels, lazy imports
        timed(fn)
    names = list(variants)
    began = time.perf_counter()
    for rep in range(args.reps):
        if rep >= 5 and time.perf_counter() - began > args.budget:
            break
        for name in names[rep % 3 :] + names[: rep % 3]:
            times[name].append(timed(variants[name]))

    median = {name: statistics.median(ts) for name, ts in times.items()}
    print(
        f"{NUM_IMAGES} images on {device}, 1 epoch, batch {BATCH_SIZE}, "
        f"{torch.get_num_threads()} threads, {len(times['trainer'])} interleaved reps"
    )
    for name, ts in times.items():
        spread = f"min {min(ts):.3f} s, max {max(ts):.3f} s"
        print(
            f"{name:>10}: {NUM_IMAGES / median[name]:8.0f} samples/s  "
            f"(median {median[name]:.3f} s; {spread})"
        )
    for other in TARGETS:
        pairs = zip(times[other], times["trainer"], strict=True)
        paired = statistics.median(o / t for o, t in pairs)
        print(f"median of paired ratios trainer/{other} = {paired:.2f}")
    for other, target in TARGETS.items():
        ratio = median[other] / median["trainer"]  # throughput ratio
        print(f"ratio trainer/{other} = {ratio:.2f} (target >= {target:g})")


if __name__ == "__main__":
    main()
