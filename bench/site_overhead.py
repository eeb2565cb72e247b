"""Site overhead: what the trial test and selection add to a bare forward pass.

A site's round costs one trial test (``trial_test``: a forward pass that also
computes every confidence metric) plus one selection (``select`` with the proxy
policy at rho = 0.05, or the one ``--policy`` names). Measured over the first
10,000 MNIST training images with LeNet-5 (``build_model("lenet5", seed=0)``)
against (a) a bare forward pass over the same 1024-image batches, sliced from
the ``uint8`` tensor exactly as ``trial_test`` slices them, under
``torch.inference_mode`` in eval mode. The target is that the full site step
costs at most 10% more than the bare pass: scoring and choosing what to send
should be nearly free once the model has run anyway.

The machine is shared and noisy, so the two variants are interleaved after
one warm-up each, alternating which goes first (bare, site, site, bare, ...)
so that drift hits both alike, and the median per variant is compared; the
median of the per-pair ratios (each site run over the bare run beside it) is
printed as well. Runs stop after ``--reps`` pairs or once ``--budget`` seconds
have passed (at least 5 pairs), so a contended machine still ends in ~40 s.

glibc's malloc hands each large activation buffer (up to 19 MB per batch)
back to the OS and page-faults it in again on the next batch; how much it does
so depends on the heap's recent history, and with it (and the shared CPUs) the
ratio swung from 0.94 to 1.37 between runs. By default this script therefore
asks glibc (``mallopt``) to keep freed memory, which takes the faults out of
both variants alike; ``--system-malloc`` leaves glibc's defaults.

Run from the repository root::

    python bench/site_overhead.py --data-dir ../shared/data/mnist
    python bench/site_overhead.py --data-dir ../shared/data/mnist --policy trimmed-proxy
    python bench/site_overhead.py --data-dir DIR --threads 1 --system-malloc

``--data-dir`` defaults to the environment variable FLWR_SELECT_DATA_DIR.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import statistics
import time

import torch

from flwr_select.data import SiteData, add_data_dir_option, load_mnist
from flwr_select.models import build_model
from flwr_select.selection.policies import POLICIES, Budget, select
from flwr_select.selection.trial import trial_test

NUM_IMAGES, BATCH_SIZE, RHO = 10_000, 1024, 0.05
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory() -> bool:
    """Ask glibc to serve big buffers from the heap and never trim it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(
            libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's 64-bit maximum
            and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
        )
    except (OSError, AttributeError):  # not glibc
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir_option(parser)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's own choice)",
    )
    parser.add_argument(
        "--reps", type=int, default=21, help="most timed runs per variant"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=30.0,
        help="stop after this many seconds of timing (once 5 runs are done)",
    )
    parser.add_argument(
        "--system-malloc", action="store_true", help="leave glibc's malloc defaults"
    )
    parser.add_argument(
        "--policy", default="proxy", choices=sorted(POLICIES), help="what selects"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pinned = not args.system_malloc and keep_freed_memory()
    torch.manual_seed(0)

    images, labels = load_mnist(args.data_dir, "train")
    site = SiteData(images[:NUM_IMAGES], labels[:NUM_IMAGES], num_classes=10)
    model = build_model("lenet5", seed=0)

    def bare() -> None:
        with torch.inference_mode():
            model.eval()
            for start in range(0, len(site), BATCH_SIZE):
                model(site.images[slice(start, start + BATCH_SIZE)])

    def site_step() -> None:
        select(trial_test(model, site), Budget(rho=RHO), args.policy, seed=0)

    variants = {"bare": bare, "site": site_step}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up: allocator, kernels, lazy imports
        fn()
    began = time.perf_counter()
    for rep in range(args.reps):
        if rep >= 5 and time.perf_counter() - began > args.budget:
            break
        for name, fn in list(variants.items())[:: 1 if rep % 2 == 0 else -1]:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(ts) for name, ts in times.items()}
    print(
        f"{NUM_IMAGES} images, batch {BATCH_SIZE}, {torch.get_num_threads()} threads, "
        f"{len(times['bare'])} interleaved reps, policy {args.policy}, "
        f"malloc {'keeps freed memory' if pinned else 'defaults'}"
    )
    for name, ts in times.items():
        spread = f"min {min(ts):.4f}, max {max(ts):.4f}"
        print(f"{name:>4}: median {median[name]:.4f} s  ({spread})")
    pairs = zip(times["site"], times["bare"], strict=True)
    paired = statistics.median(site_s / bare_s for site_s, bare_s in pairs)
    print(f"median of paired ratios site/bare = {paired:.2f}")
    print(f"ratio site/bare = {median['site'] / median['bare']:.2f} (target <= 1.10)")


if __name__ == "__main__":
    main()
