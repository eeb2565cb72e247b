"""One site, one round of the engine on real MNIST-format data, from the command line.

Trains LeNet-5 briefly on 5,000 samples (the paper's initial model), then plays a
site holding the next 5,000: trial test, selection of the best fraction ``rho``
by each of the paper's three schemes, and the upload packed as Flower would send
it, raw and compressed. Run ``python -m flwr_select.selection.demo --help``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from flwr_select.data import SiteData, add_data_dir_option, load_mnist
from flwr_select.models import build_model
from flwr_select.selection.policies import Budget, select
from flwr_select.selection.trial import trial_test
from flwr_select.selection.wire import decode, pack, wire_bytes

INITIAL, FOLD = 5_000, 5_000


def train_briefly(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int
) -> None:
    """Two epochs of Adam on ``images``: just enough to give the trial test meaning."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(2):
        for batch in torch.randperm(len(images), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()


def main(argv: list[str] | None = None) -> None:
    """Run the demo and print one line per selection scheme."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir_option(parser)
    parser.add_argument("--rho", type=float, default=0.05, help="fraction to upload")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    budget = Budget(rho=args.rho)

    images, labels = load_mnist(args.data_dir, "train")
    model = build_model("lenet5", seed=args.seed)
    started = time.perf_counter()
    train_briefly(model, images[:INITIAL], labels[:INITIAL], args.seed)
    print(f"initial model: {INITIAL} samples, {time.perf_counter() - started:.1f} s")

    fold = torch.arange(INITIAL, INITIAL + FOLD)  # positions, also the sample ids
    site = SiteData(images[fold], labels[fold], num_classes=10, ids=fold)
    trial = trial_test(model, site)
    limit = budget.sample_limit(len(site))
    print(
        f"site: {len(site)} samples, trial accuracy {trial.accuracy:.4f}, "
        f"{int(trial.wrong.sum())} wrong; budget {limit} samples"
    )
    for policy in ("uniform", "oblivious", "proxy"):
        chosen = select(trial, budget, policy, seed=args.seed)
        raw, packed = (pack(site, chosen, compress=c) for c in (False, True))
        assert (
            decode(packed, 10, sample_shape=(28, 28))[0].ids.tolist()
            == site.ids[chosen].tolist()
        )
        wrong = int(trial.wrong[chosen].sum())
        loss = trial.confidence["cross-entropy"][chosen].mean()
        print(
            f"{policy:>10}: {len(chosen)} samples, {wrong} wrong, mean cross-entropy "
            f"{loss:.3f}, {wire_bytes(raw)} bytes ({wire_bytes(packed)} compressed)"
        )


if __name__ == "__main__":
    main()
