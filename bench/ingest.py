"""Server ingest per stage, apart from the sites and from Flower's transport.

What limits the system as sites multiply is the server: how fast it takes in
uploads. This times, in-process, what the ServerApp does with each upload once
Flower has handed it the reply (the same calls ``SelectionServer.accept_uploads``
makes), for ``--sites`` uploads a round of ``--per-site`` real MNIST samples
each (pre-encoded, as the sites would send them: no trial test, no model on
the site side), over ``--rounds`` rounds:

- decode + validation: ``SelectionServer.check_upload`` (wire bytes, budget,
  declarations, the ``.npy`` bytes, labels, ids, ids seen before); of it, the
  wire accounting (``wire_bytes``: Flower addresses each chunk by its sha256,
  so counting the distinct objects an upload is sent as hashes every byte once)
  is also timed alone;
- buffer add: ``TrainingBuffer.add`` (dedup by (site, id), the ledger);
- audit: ``SelectionServer.audit``, the server model's forward pass over each
  upload (how many labels it calls likely wrong); not memory-bound, shown apart;
- checkpoint: ``SelectionServer.finish_round`` (the round's segment, manifest).

Last, a site's ledger at scale (``--ledger`` ids): checking and adding an
upload's ids against ``np.isin`` and ``np.union1d`` over it, side by side.

Beside them, the floor: one plain copy of the same upload bytes into a
preallocated array (``np.copyto``), what memory bandwidth allows on this CPU.
The ratio of decode + validation + buffer add to that copy is printed (target
<= 4x). Rates are samples/s and MB/s of upload bytes. Run from the repository
root::

    python bench/ingest.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections import defaultdict

import numpy as np
import torch

from flwr_select.data import SiteData, add_data_dir_option, load_mnist
from flwr_select.models import build_model
from flwr_select.selection.buffer import TrainingBuffer
from flwr_select.selection.ledger import SentLedger
from flwr_select.selection.protocol import SelectionConfig
from flwr_select.selection.server import SelectionServer
from flwr_select.selection.wire import pack, wire_bytes

RHO = 0.05
"""Each upload is ``rho`` of the site's candidates (``num-candidates``)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir_option(parser)
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--per-site", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ledger", type=int, default=1_000_000, help="ids, at scale")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core: what one upload's handling costs
    images, labels = load_mnist(args.data_dir)
    rng = np.random.default_rng(0)
    rounds = []
    for number in range(args.rounds):
        uploads = []
        for site in range(args.sites):
            ids = rng.choice(len(labels), args.per_site, replace=False)
            ids = np.sort(ids) + number * len(labels)  # new ids every round
            rows = torch.from_numpy(ids % len(labels))
            data = SiteData(images[rows], labels[rows], 10, ids=torch.from_numpy(ids))
            uploads.append((site + 1, pack(data, np.arange(args.per_site))))
        rounds.append(uploads)
    upload_bytes = sum(wire_bytes(record) for _, record in rounds[0])
    samples = args.sites * args.per_site
    floor = np.empty(
        max(sum(len(a.data) for _, r in up for a in r.values()) for up in rounds),
        np.uint8,
    )
    seconds: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        server = SelectionServer(
            functools.partial(build_model, "lenet5", seed=0),
            10,
            selection=SelectionConfig(rho=RHO),
            buffer=TrainingBuffer(10, device="cpu"),
            run_dir=tmp,
            sample_shape=(28, 28),
        )
        server.finish_round(0, None)
        for number, uploads in enumerate(rounds, start=1):
            stages: dict[str, float] = defaultdict(float)
            start = time.perf_counter()
            offset = 0
            for _, record in uploads:
                for array in record.values():
                    data = np.frombuffer(array.data, np.uint8)
                    np.copyto(floor[offset : offset + len(data)], data)
                    offset += len(data)
            stages["copy (floor)"] = time.perf_counter() - start
            for _, record in uploads:
                start = time.perf_counter()
                wire_bytes(record)
                stages["  of which wire accounting"] += time.perf_counter() - start
            for site, record in uploads:
                start = time.perf_counter()
                data, _ = server.check_upload(site, record, round(args.per_site / RHO))
                middle = time.perf_counter()
                server.buffer.add(site, data)
                added = time.perf_counter()
                server.audit(site, data)
                stages["decode + validation"] += middle - start
                stages["buffer add"] += added - middle
                stages["audit (forward pass)"] += time.perf_counter() - added
            start = time.perf_counter()
            server.finish_round(number, {"accuracy": 0.0})
            stages["checkpoint"] = time.perf_counter() - start
            for name, value in stages.items():
                seconds[name].append(value)
    order = ["copy (floor)", "decode + validation", "  of which wire accounting"]
    order += ["buffer add", "audit (forward pass)", "checkpoint"]
    median = {name: statistics.median(seconds[name]) for name in order}
    print(
        f"{args.sites} uploads x {args.per_site} MNIST samples a round "
        f"({upload_bytes / 1e6:.1f} MB), {args.rounds} rounds, medians, 1 thread"
    )
    print(f"{'stage':<24} {'s/round':>8} {'samples/s':>11} {'MB/s':>8} {'x copy':>7}")
    for name, value in median.items():
        print(
            f"{name:<24} {value:>8.4f} {samples / value:>11,.0f} "
            f"{upload_bytes / 1e6 / value:>8.0f} {value / median['copy (floor)']:>7.1f}"
        )
    owned = median["decode + validation"] + median["buffer add"]
    print(
        f"decode + validation + buffer add: {owned:.4f} s/round, "
        f"{owned / median['copy (floor)']:.1f}x the copy (target <= 4x)"
    )
    ledger_at_scale(args.ledger, args.per_site)


def ledger_at_scale(size: int, count: int) -> None:
    """Time a site's ledger of ``size`` ids against NumPy's set operations on it.

    Every upload is checked against its site's ledger and merged into it; a
    ledger grows with every round the site sends in, so this cost must not grow
    with it as a sort of the whole ledger would.
    """
    held = np.arange(0, 2 * size, 2)  # even ids held, the new ones odd
    new = [np.arange(2 * i * count + 1, 2 * (i + 1) * count, 2) for i in range(5)]
    timed: dict[str, list[float]] = defaultdict(list)
    for ids in new:
        ledger = SentLedger(held)
        for name, action in (
            ("SentLedger.contains", lambda: ledger.contains(ids)),  # noqa: B023
            ("np.isin", lambda: np.isin(ids, held)),  # noqa: B023
            ("SentLedger.add", lambda: ledger.add(ids)),  # noqa: B023
            ("np.union1d", lambda: np.union1d(held, ids)),  # noqa: B023
        ):
            start = time.perf_counter()
            action()
            timed[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(values) * 1e3 for name, values in timed.items()}
    check, isin = ms["SentLedger.contains"], ms["np.isin"]
    add, union = ms["SentLedger.add"], ms["np.union1d"]
    print(
        f"a ledger of {size:,} ids, {count:,} new ones: check {check:.2f} ms "
        f"(np.isin {isin:.2f} ms, {isin / check:.0f}x), add {add:.2f} ms "
        f"(np.union1d {union:.2f} ms, {union / add:.0f}x)"
    )


if __name__ == "__main__":
    main()
