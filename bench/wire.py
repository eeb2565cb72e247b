"""Wire format: encode/decode throughput and bytes on the wire per sample.

(i) Throughput, in MB/s of raw image bytes (784 per MNIST image), of one
upload of 5,000 samples through the whole wire path: ``encode`` of the subset,
``wire_bytes`` (what Flower's serialization computes: it deflates every object
and hashes it) and ``decode``, uncompressed and with ``compress=True``
(Zstandard). The two variants are interleaved over several repetitions and the
median per variant is reported, since the machine is shared and noisy.

(ii) Bytes on the wire per sample, ``wire_bytes(pack(site, positions)) / n``,
for uploads of n = 50, 250, 1000 and 5000 samples, each also as a ratio to
the raw 785 bytes of a sample (784 pixels + 1 label byte). n = 250 is
rho = 0.05 of a 5,000-sample fold, the paper's setting; the targets there are
at most 2% over raw uncompressed (per-upload overhead and ids are small) and
at most 0.40x raw compressed. Sizes are deterministic.

Samples are 5,000 positions drawn with a fixed seed from the first 10,000
MNIST training images (ids 0..9999); an upload of n takes the first n of them.

Run from the repository root::

    python bench/wire.py --data-dir ../shared/data/mnist

``--data-dir`` defaults to the environment variable FLWR_SELECT_DATA_DIR.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from flwr_select.data import SiteData, add_data_dir_option, load_mnist
from flwr_select.selection.wire import decode, encode, pack, wire_bytes

POOL, UPLOAD = 10_000, 5_000  # draw the upload from the first POOL training images
SIZES, TARGET_N = (50, 250, 1000, 5000), 250  # upload sizes; 250 = rho 0.05 of 5,000
RAW_PER_SAMPLE = 28 * 28 + 1  # pixels + one label byte
TARGETS = {False: ("uncompressed", 1.02), True: ("compressed", 0.40)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir_option(parser)
    parser.add_argument("--reps", type=int, default=25, help="timed runs per variant")
    args = parser.parse_args()
    torch.manual_seed(0)

    images, labels = load_mnist(args.data_dir, "train")
    site = SiteData(
        images[:POOL], labels[:POOL], num_classes=10, ids=torch.arange(POOL)
    )
    positions = np.random.default_rng(0).choice(POOL, size=UPLOAD, replace=False)

    def round_trip(compress: bool) -> SiteData:
        record = encode(site.subset(positions), compress=compress)
        wire_bytes(record)
        return decode(record, 10, sample_shape=(28, 28))[0]

    times: dict[bool, list[float]] = {False: [], True: []}
    for compress in times:  # warm-up, and check the round trip is lossless
        samples = round_trip(compress)
        assert torch.equal(samples.images, site.images[positions])
        assert torch.equal(samples.ids, site.ids[positions])
    for rep in range(args.reps):
        for compress in (False, True)[:: 1 if rep % 2 == 0 else -1]:
            start = time.perf_counter()
            round_trip(compress)
            times[compress].append(time.perf_counter() - start)
    megabytes = UPLOAD * site.images[0].numel() / 1e6
    print(
        f"encode + wire_bytes + decode of {UPLOAD} samples "
        f"({megabytes:.2f} MB of pixels), median of {args.reps} interleaved reps:"
    )
    for compress, (label, _) in TARGETS.items():
        median = statistics.median(times[compress])
        print(f"  {label:>12}: {median * 1e3:7.1f} ms  {megabytes / median:7.1f} MB/s")

    ratio: dict[tuple[bool, int], float] = {}
    header = ("n", "uncompressed B/sample", "ratio", "compressed B/sample", "ratio")
    print("\n{:>5} {:>22} {:>6} {:>20} {:>6}".format(*header))
    for n in SIZES:
        row = [f"{n:>5}"]
        for compress in TARGETS:
            per_sample = wire_bytes(pack(site, positions[:n], compress=compress)) / n
            ratio[compress, n] = per_sample / RAW_PER_SAMPLE
            width = 22 if not compress else 20
            row.append(f"{per_sample:>{width}.1f} {ratio[compress, n]:>6.3f}")
        print(" ".join(row))
    for compress, (label, target) in TARGETS.items():
        print(
            f"ratio {label}/raw at n={TARGET_N} = {ratio[compress, TARGET_N]:.3f} "
            f"(target <= {target:.2f})"
        )


if __name__ == "__main__":
    main()
