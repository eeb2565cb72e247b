"""Deployment load: many large uploads through a real SuperLink on loopback.

Starts one ``flower-superlink`` and ``--sites`` ``flower-supernode`` processes
(:class:`tests.loopback.LocalDeployment`, insecure loopback) and submits
``simulations.mnist`` with ``flwr run``. Each site's data folder holds
``--site-size`` MNIST training images (a seeded random draw per site, so sites
overlap; ids are MNIST indices, unique within a site), and every round every
site sends ``--per-round`` of its unsent samples: ``selection-policy="uniform"``,
``rho=1.0``, ``max-count=--per-round``, ``min-nodes=--sites``. The server's own
training is kept small (the paper's LeNet-5, 1,000 initial samples, one initial
epoch, one epoch over the buffer per round), so the uploads and Flower's handling
of them dominate.
Defaults: 10 sites x 5,000 samples per round x 3 rounds = 150,000 samples,
about 118 MB of raw pixels.

Reported, per round and over the run (from ``out-dir/rounds.jsonl`` and
``execution.jsonl``):

* samples/s and MB/s received into the buffer: ``samples_received`` and
  ``bytes_received`` (wire bytes) over the round's ``seconds`` (in
  ``execution.jsonl``: its whole wall time: sites' trial tests and uploads,
  the server's checks, training, evaluation and checkpoint);
* where the round's time went on the server: the strategy's own stage timings
  (``check-seconds``, ``audit-seconds``, ``add-seconds``, ``train-seconds`` of
  its metrics, from the checkpoint), and the rest (``rest s``): Flower's
  transfer and polling (the SuperLink's, the SuperNodes' and the ServerApp's,
  every 3 s), the sites' work, the evaluation and the checkpoint;
* wire bytes per sample beside the raw 785 (784 pixels and a label byte);
* peak memory of the ServerApp process (``server_peak_rss_bytes`` of
  ``execution.jsonl``, its
  ``getrusage`` maximum) and of the SuperLink process (``VmHWM`` in
  ``/proc/<pid>/status``, read before it is stopped), beside the raw size of
  the final buffer;
* sites whose upload failed in a round (``sites_failed``: Flower delivered an
  error instead of the reply), and
* whether every sample arrived exactly once: every (site, id) pair in the
  final buffer unique, and each site's ids in the buffer exactly the ids its
  ledger (``sent-ids.npz`` in its folder) counts as delivered: those sent in a
  round the server did not list as undelivered for that node.

By default the SuperLink keeps its state and the uploads in SQLite
(``--database``); ``--in-memory-state`` runs it without. On a busy host SQLite
can refuse an upload chunk ("database is locked" after its 5 s busy timeout):
the SuperNode does not retry an HTTP 500, and the reply may never arrive, so
the round waits out ``--round-timeout`` (default 300 s; the app's default is an
hour). The site then counts as undelivered for that round: the server tells it
so, and it offers those samples again in its next round (so the run ends with
fewer than per-round x rounds from it, each once).

With ``--replay`` the sites do no work: each SuperNode runs
``bench/replay_site.py``, which sends the round's next ``--per-round`` samples
of its folder as a ready upload (no torch, no model, no trial test), so what is
measured is the server's ingest: the SuperLink's transfer and the ServerApp's
checks, buffer, audit, training and checkpoint (``bench/ingest.py`` times the
ServerApp's stages alone). Its exactly-once check compares each site's buffer
rows with the blocks it replayed in the rounds the server kept.

Run from the repository root with the ``test`` or ``experiments`` extra installed
(5-6 minutes on this project's 2-core machine at the default size; ``--sites 3
--site-size 3000 --per-round 1000 --rounds 2`` for a quick look)::

    python bench/deployment_load.py --data-dir ../shared/data/mnist
    python bench/deployment_load.py --data-dir ../shared/data/mnist --in-memory-state

``--data-dir`` defaults to the environment variable FLWR_SELECT_DATA_DIR.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from flwr_select.data import add_data_dir_option, load_mnist
from flwr_select.files import read_json_lines
from flwr_select.selection.checkpoint import latest

# The loopback harness is test code (tests/loopback.py), not installed: python puts
# only bench/ on the path of a script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import replay_site  # noqa: E402
from flwr_select.selection import protocol  # noqa: E402
from tests.loopback import PROJECT_DIR, LocalDeployment, packed_files  # noqa: E402

RAW_PER_SAMPLE = 28 * 28 + 1  # pixels + one label byte
INITIAL_SIZE, VALIDATION_SIZE = 1000, 1000
MB = 1e6


def write_site_folders(
    data_dir: Path, root: Path, sites: int, site_size: int
) -> list[Path]:
    """Write one ``data.npz`` of ``site_size`` MNIST training samples per site."""
    images, labels = load_mnist(data_dir, "train")
    images, labels = images.numpy(), labels.numpy()
    if site_size > len(labels):
        sys.exit(f"--site-size {site_size} exceeds MNIST's {len(labels)} images")
    folders = []
    for site in range(sites):
        rng = np.random.default_rng(site)
        ids = np.sort(rng.choice(len(labels), size=site_size, replace=False))
        folder = root / f"site-{site}"
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "data.npz", images=images[ids], labels=labels[ids], ids=ids)
        folders.append(folder)
    return folders


def replay_app(folder: Path) -> Path:
    """Write the project's app with the replaying ClientApp into ``folder``."""
    names = (protocol.ACTION, protocol.CONFIG_KEY, protocol.UPLOAD_KEY)
    replayed = (replay_site.ACTION, replay_site.CONFIG_KEY, replay_site.UPLOAD_KEY)
    if names + (protocol.METRICS_KEY,) != replayed + (replay_site.METRICS_KEY,):
        sys.exit("bench/replay_site.py's message names are not the protocol's")
    for name in packed_files():  # and "" (the FAB's size), .info/ (its manifest)
        if not (PROJECT_DIR / name).is_file():
            continue
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PROJECT_DIR / name, folder / name)
    shutil.copyfile(Path(replay_site.__file__), folder / "replay_site.py")
    pyproject = (folder / "pyproject.toml").read_text()
    replaced = pyproject.replace(
        'clientapp = "simulations.mnist:client_app"',
        'clientapp = "replay_site:client_app"',
    ).replace("fab-include = [\n", 'fab-include = [\n    "replay_site.py",\n')
    if replaced.count("replay_site") != 2:
        sys.exit(
            "pyproject.toml's components or fab-include changed: update replay_app"
        )
    (folder / "pyproject.toml").write_text(replaced)
    return folder


def process_peak_rss_bytes(pid: int) -> int:
    """Return a live process's peak resident memory (``VmHWM``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_data_dir_option(parser)
    parser.add_argument("--sites", type=int, default=10, help="SuperNodes")
    parser.add_argument(
        "--site-size", type=int, default=15_000, help="samples in each site's folder"
    )
    parser.add_argument(
        "--per-round", type=int, default=5_000, help="samples each site sends a round"
    )
    parser.add_argument("--rounds", type=int, default=3, help="server rounds")
    parser.add_argument(
        "--in-memory-state",
        action="store_true",
        help="run the SuperLink without --database (state and uploads in memory)",
    )
    parser.add_argument(
        "--replay",
        action="store_true",
        help="sites replay ready uploads (bench/replay_site.py): the server's ingest",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="limit for the run, s"
    )
    parser.add_argument(
        "--round-timeout",
        type=float,
        default=300.0,
        help="seconds a round waits for the sites' replies (run config)",
    )
    parser.add_argument(
        "--work-dir",
        default=None,
        help="keep data, logs and the run's files here (default: a temp folder)",
    )
    args = parser.parse_args()
    if args.per_round * args.rounds > args.site_size:
        sys.exit("--per-round x --rounds exceeds --site-size: sites would run dry")
    data_dir = Path(args.data_dir).resolve()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp).resolve()
        folders = write_site_folders(
            data_dir, work / "data", args.sites, args.site_size
        )
        out_dir = work / "out"
        run_config = {
            "num-server-rounds": args.rounds,
            "selection-policy": "uniform",
            "rho": 1.0,
            "max-count": args.per_round,
            "min-nodes": args.sites,
            "validation-size": VALIDATION_SIZE,
            "initial-size": INITIAL_SIZE,
            "initial-epochs": 1,
            "server-epochs": 1,
            "model": "lenet5",  # the paper's, not the wider default: ingest is measured
            "round-timeout": args.round_timeout,
            "data-dir": str(data_dir),
            "out-dir": str(out_dir),
        }
        sites = [{"data-dir": str(folder)} for folder in folders]
        started = time.perf_counter()
        app_dir = PROJECT_DIR
        if args.replay:
            app_dir = replay_app(work / "replay-app")
        with LocalDeployment(
            work / "flower",
            sites,
            database=not args.in_memory_state,
            app_dir=app_dir,
        ) as deployment:
            ready = time.perf_counter()
            done = deployment.run(run_config, timeout=args.timeout)
            # the log stream can end before the ServerApp does (a SuperLink
            # too busy to serve it): the run is over when its ServerApp is
            while deployment.serverapp_pids():
                if time.perf_counter() - ready > args.timeout:
                    sys.exit(f"the ServerApp still runs after {args.timeout:.0f} s")
                time.sleep(1.0)
            finished = time.perf_counter()
            superlink_peak = process_peak_rss_bytes(deployment.superlink.pid)
            site_folders = {
                node.node_id: Path(str(node.node_config["data-dir"]))
                for node in deployment.supernodes
            }
            if done.returncode != 0:
                print(deployment.log_tails(40))
                sys.exit(f"flwr run failed (exit {done.returncode})")
        records = read_json_lines(out_dir / "rounds.jsonl")
        if len(records) != args.rounds + 1:
            sys.exit(f"the run ended after round {len(records) - 1} of {args.rounds}")
        measured = {e["round"]: e for e in read_json_lines(out_dir / "execution.jsonl")}
        checkpoint = latest(out_dir, device="cpu")
        if checkpoint is None:
            sys.exit(f"no checkpoint in {out_dir}")
        ledgers = {}  # what each site counts as sent: (ids, rounds)
        for node_id, folder in site_folders.items():
            if args.replay:  # the blocks it replayed, round after round
                with np.load(folder / "data.npz") as data:
                    ids = data["ids"][: args.rounds * args.per_round]
                rounds = np.arange(len(ids)) // args.per_round + 1
                ledgers[node_id] = ids, rounds
                continue
            with np.load(folder / "sent-ids.npz") as ledger:
                ledgers[node_id] = ledger["ids"], ledger["rounds"]

    print(
        f"{args.sites} {'replaying ' if args.replay else ''}SuperNodes x "
        f"{args.per_round:,} samples per round x "
        f"{args.rounds} rounds on loopback (insecure, SuperLink state "
        f"{'in memory' if args.in_memory_state else 'in SQLite'}); deployment up in "
        f"{ready - started:.1f} s, run {finished - ready:.1f} s"
    )
    stages = ("check", "audit", "add", "train")
    header = (
        f"{'round':>5} {'sites ok/failed':>15} {'samples':>9} {'MB':>7} "
        f"{'B/sample':>9} {'s':>7} "
        + " ".join(f"{stage + ' s':>8}" for stage in stages)
        + f" {'rest s':>7} {'samples/s':>10} {'MB/s':>7}"
    )
    print(header)

    def row(label: str, sites: str, samples: int, wire: int, seconds: float, spent):
        rest = seconds - sum(spent.values())
        print(
            f"{label:>5} {sites:>15} {samples:>9,} {wire / MB:>7.1f} "
            f"{wire / max(samples, 1):>9.1f} {seconds:>7.1f} "
            + " ".join(f"{spent[stage]:>8.2f}" for stage in stages)
            + f" {rest:>7.1f} {samples / seconds:>10,.0f} {wire / MB / seconds:>7.2f}"
        )

    totals = {"samples": 0, "bytes": 0, "seconds": 0.0}
    spent_in_all = dict.fromkeys(stages, 0.0)
    for record in records[1:]:
        samples, wire = record["samples_received"], record["bytes_received"]
        seconds = measured[record["round"]]["seconds"]
        metrics = checkpoint.train_metrics.get(record["round"], {})
        spent = {stage: float(metrics.get(f"{stage}-seconds", 0.0)) for stage in stages}
        totals["samples"] += samples
        totals["bytes"] += wire
        totals["seconds"] += seconds
        for stage in stages:
            spent_in_all[stage] += spent[stage]
        sites = f"{record['sites_accepted']:>9}/{record.get('sites_failed', 0):<5}"
        row(str(record["round"]), sites, samples, wire, seconds, spent)
    samples, wire = totals["samples"], totals["bytes"]
    row("all", "", samples, wire, totals["seconds"], spent_in_all)
    print(
        f"wire bytes per sample {wire / max(samples, 1):.1f} against raw "
        f"{RAW_PER_SAMPLE}: {wire / max(samples, 1) / RAW_PER_SAMPLE:.3f}x"
    )

    buffer = checkpoint.buffer
    buffer_raw = len(buffer) * RAW_PER_SAMPLE
    server_peak = max(e["server_peak_rss_bytes"] for e in measured.values())
    print(
        f"peak memory: ServerApp {server_peak / MB:,.0f} MB, SuperLink "
        f"{superlink_peak / MB:,.0f} MB; final buffer {len(buffer):,} samples = "
        f"{buffer_raw / MB:,.0f} MB raw (ServerApp peak / buffer: "
        f"{server_peak / buffer_raw:.1f}x)"
    )

    pairs = np.stack([buffer.sites, buffer.ids.astype(np.uint64)])
    unique_pairs = np.unique(pairs, axis=1).shape[1]
    per_site, mismatched = [], []
    for node_id, (ids, rounds) in ledgers.items():
        lost = checkpoint.undelivered.get(node_id, [])
        delivered = ids[~np.isin(rounds, lost)]
        received = buffer.ids[buffer.sites == np.uint64(node_id)]
        per_site.append(len(received))
        if len(received) != len(delivered) or set(received) != set(delivered):
            mismatched.append(node_id)
    servers_own = len(buffer) - sum(per_site)
    exactly_once = unique_pairs == len(buffer) and not mismatched
    print(
        f"exactly once: {'yes' if exactly_once else 'NO'} ({len(buffer):,} samples, "
        f"{unique_pairs:,} unique (site, id) pairs; per site {min(per_site):,}-"
        f"{max(per_site):,} of {args.per_round * args.rounds:,} asked; sites whose "
        f"buffer rows differ from their ledger: {len(mismatched)}; undelivered "
        f"(node: rounds): {checkpoint.undelivered or 'none'}; the server's own "
        f"{servers_own:,})"
    )
    if not exactly_once:
        sys.exit(1)


if __name__ == "__main__":
    main()
