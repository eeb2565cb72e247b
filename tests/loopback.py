"""Run this project's Flower app on real Flower processes on one machine (loopback).

A deployment is what an edge installation runs, all on 127.0.0.1: one
``flower-superlink`` and one ``flower-supernode`` per site, each site reading its
own data folder (node config ``data-dir``), and the app submitted with
``flwr run <project> <connection> --stream``. Tests, the load benchmark and a user
who wants to try deployment before touching an edge box use it the same way, from
the repository root with the ``test`` extra installed (it is test code, not part of
the app that travels to the sites)::

    from tests.loopback import LocalDeployment

    sites = [{"data-dir": "/data/site-a"}, {"data-dir": "/data/site-b"}]
    with LocalDeployment("/tmp/deploy", sites) as deployment:
        done = deployment.run(
            {"num-server-rounds": 2, "data-dir": "/data/mnist", "out-dir": "/tmp/out"}
        )
        print(done.returncode, done.stdout[-2000:])

What it does, in order, all under ``root_dir``:

* picks free loopback ports at run time (one for the SuperLink's Fleet, Control
  and Runtime APIs, one per SuperNode for its own Runtime API);
* starts the SuperLink with ``--disable-runtime-dependency-installation`` (the
  installed environment runs the app: no ``uv sync`` pulling a second torch) and
  ``--database superlink/state.db`` (unless ``database=False``);
* writes the CLI's ``cli/config.toml`` (a connection named ``local``; the CLI
  runs with ``FLWR_HOME=root_dir/cli``);
* with SuperNode authentication, registers each site's public key with
  ``flwr supernode register`` (the SuperLink no longer takes a list of keys:
  ``--auth-list-public-keys`` is refused; a SuperNode whose key is not
  registered exits);
* starts one SuperNode per site, each with its own ``FLWR_HOME``, ``--port`` and
  ``--node-config``, ten at a time (:data:`STARTING_AT_ONCE`), and waits until
  each has logged its node id;
* on exit (also when the body raised) stops every process it started **by PID**:
  runs still streaming, then the SuperNodes, then the SuperLink, each with
  SIGTERM and SIGKILL after ``stop_timeout``; then, by PID, any process they had
  spawned that outlived them (``flower-superexec``, ``flwr-serverapp``,
  ``flwr-clientapp``: Flower starts the SuperLink's SuperExec in a session of its
  own, so it is not in the SuperLink's process group), and what processes
  killed with :meth:`LocalDeployment.kill` left behind.

Every process writes its output to a log file in ``root_dir``
(:meth:`LocalDeployment.log_tails` returns their ends, for failure messages).
Run configs and node configs are passed as TOML files, so any path works in them.
``out-dir`` in a run config should be absolute: the ServerApp runs in the
SuperLink's folder.

The app is packed by ``flwr run`` into a FAB (at most 10 MB) from the project
folder: the files Flower's rules select (``*.py``, ``*.toml``, ``*.md``,
``*.json``, ``*.jsonl``, ``*.yaml``, not ``test_*.py``, not what ``.gitignore``
names), narrowed by ``fab-include`` / ``fab-exclude`` in ``[tool.flwr.app]`` of
``pyproject.toml`` when present. :func:`packed_files` lists what would be sent;
:meth:`LocalDeployment.start` refuses to start when the FAB would be too large,
naming the largest files. Data never belongs in the app: sites read their own
folders.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import tomli_w

from flwr_select.flower_private import build_fab_from_disk

PROJECT_DIR = Path(__file__).resolve().parents[1]
"""The repository root: the Flower app ``flwr run`` packs (``pyproject.toml``)."""

STARTING_AT_ONCE = 10
"""SuperNodes started together, each batch once the one before has connected: 50
starting at once on 2 cores overload the SuperLink, and a SuperNode gives up after
30 s and two failed activations (Flower 1.42)."""

HOST = "127.0.0.1"
CONNECTION = "local"
"""Name of the SuperLink connection in the CLI's ``config.toml``."""

FLOWER_ENV = {
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # Also keeps a ServerApp or ClientApp from installing the app's dependencies.
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
"""Environment of every Flower process the deployment starts."""

FAB_LIMIT = 10 * 1024 * 1024
"""Flower's limit on the size of a FAB (``flwr.common.constant.FAB_MAX_SIZE``)."""

NODE_ID_LINE = re.compile(r"SuperNode ID: (\d+)")
"""What a SuperNode logs once the SuperLink has activated it."""

ConfigValue = bool | int | float | str


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for TLS between the SuperLink and everything that connects to it.

    ``ca_certificate`` is what SuperNodes and the CLI trust
    (``--root-certificates``, ``root-certificates``); ``server_certificate``
    must name ``127.0.0.1`` (a subject alternative name) for a loopback
    deployment, since SuperNodes, the CLI and the SuperLink's own SuperExec
    connect to that address.
    """

    ca_certificate: Path
    server_certificate: Path
    server_key: Path


@dataclass(frozen=True)
class AuthKeys:
    """SuperNode authentication: one private key per site, in site order.

    Each is an unencrypted OpenSSH private key on a NIST elliptic curve (what
    ``ssh-keygen -t ecdsa -b 384 -N "" -f site-1`` writes), with its OpenSSH
    public key beside it as ``<private key>.pub``. Authentication needs TLS.
    """

    private_keys: Sequence[Path]


def public_key_path(private_key: Path) -> Path:
    """Return where the public key of ``private_key`` lies (``ssh-keygen``'s name)."""
    return private_key.with_name(private_key.name + ".pub")


def free_port() -> int:
    """Return a TCP port on the loopback interface that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def packed_files(app_dir: Path = PROJECT_DIR) -> dict[str, int]:
    """Return the files ``flwr run`` would pack from ``app_dir``, with their sizes.

    Uses Flower's own FAB builder (the function ``flwr run`` calls), so the
    list is exact; the special entry ``""`` holds the size of the whole FAB.
    """
    fab = build_fab_from_disk(Path(app_dir))
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        sizes = {info.filename: info.file_size for info in archive.infolist()}
    return {"": len(fab), **sizes}


def check_fab_size(app_dir: Path = PROJECT_DIR) -> int:
    """Return the size of ``app_dir``'s FAB; raise if it is over Flower's limit."""
    sizes = packed_files(app_dir)
    total = sizes.pop("")
    if total > FAB_LIMIT:
        largest = sorted(sizes.items(), key=lambda item: -item[1])[:10]
        listing = "\n".join(f"  {size:>12,}  {name}" for name, size in largest)
        raise RuntimeError(
            f"{app_dir} packs into a {total:,}-byte FAB, over Flower's "
            f"{FAB_LIMIT:,}. Narrow fab-include or add fab-exclude patterns in "
            f"[tool.flwr.app] of pyproject.toml. Largest files:\n{listing}"
        )
    return total


def _start_time(pid: int) -> int | None:
    """Return a live process's start time (clock ticks after boot), else None.

    A zombie (exited, not yet reaped) counts as gone.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; the fields after it do not.
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else int(fields[19])


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[tuple[int, int]]:
    """Return ``(pid, start time)`` of every process below ``pid``, from ``/proc``.

    The start time tells a process from a later one that reuses its PID.
    """
    children = _children_by_parent()
    found, pending = [], list(children.get(pid, []))
    while pending:
        child = pending.pop()
        started = _start_time(child)
        if started is not None:
            found.append((child, started))
        pending.extend(children.get(child, []))
    return found


def command_line(pid: int) -> list[str]:
    """Return the arguments a process was started with (empty if it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def still_running(pid: int, started: int) -> bool:
    """Whether ``pid`` is still the live process that started at ``started``."""
    return _start_time(pid) == started


def kill_if_same(pid: int, started: int, sig: int = signal.SIGKILL) -> bool:
    """Send ``sig`` to ``pid`` if it is still the process started at ``started``."""
    if not still_running(pid, started):
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def _config_file(path: Path, values: Mapping[str, ConfigValue]) -> Path:
    """Write ``values`` as a flat TOML file (how Flower takes run and node configs)."""
    path.write_text(tomli_w.dumps(dict(values)))
    return path


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class FlowerProcess:
    """One process the deployment started, with the file its output goes to."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    @property
    def running(self) -> bool:
        """Whether the process has not exited yet."""
        return self.popen.poll() is None

    def log(self) -> str:
        """Return everything the process has written so far."""
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        """Return the last ``lines`` lines of the process's output."""
        return _tail(self.log_path, lines)

    def stop(self, timeout: float) -> None:
        """Stop the process and what it spawned (see :func:`stop_processes`)."""
        stop_processes([self], timeout)


def stop_processes(processes: Sequence[FlowerProcess], timeout: float) -> None:
    """Stop processes together: SIGTERM, then SIGKILL after ``timeout`` s.

    Then the processes they had spawned (noted before the signal: once a parent
    is gone its children belong to init) are killed by PID if they outlive
    their parents by ``timeout`` s.
    """
    spawned = [child for process in processes for child in descendants(process.pid)]
    for process in processes:
        if process.running:
            process.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            process.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.popen.kill()
            process.popen.wait()
    deadline = time.monotonic() + timeout
    while any(still_running(pid, started) for pid, started in spawned):
        if time.monotonic() > deadline:
            for pid, started in spawned:
                kill_if_same(pid, started)
            return
        time.sleep(0.1)


@dataclass
class SuperNode(FlowerProcess):
    """A SuperNode process: its node config, Runtime API port and key."""

    node_config: Mapping[str, ConfigValue] = field(default_factory=dict)
    port: int = 0
    private_key: Path | None = None
    node_id: int | None = None
    """The id the SuperLink gave the node (known once :meth:`wait_connected`)."""

    def wait_connected(self, timeout: float) -> int:
        """Wait until the SuperLink has activated the node; return its node id.

        Raises ``RuntimeError`` with the log's tail if the process exits first
        (e.g. its key is not registered) or ``timeout`` s pass.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := NODE_ID_LINE.search(self.log()):
                self.node_id = int(match.group(1))
                return self.node_id
            if not self.running:
                raise RuntimeError(
                    f"{self.name} exited ({self.popen.returncode}) before it "
                    f"connected:\n{self.tail()}"
                )
            time.sleep(0.2)
        raise RuntimeError(
            f"{self.name} did not connect in {timeout} s:\n{self.tail()}"
        )


class LocalDeployment:
    """One SuperLink and one SuperNode per site on loopback; a context manager.

    Parameters
    ----------
    root_dir : str or Path
        Folder for everything the deployment writes: databases, ``FLWR_HOME``
        folders, config files and one log per process.
    sites : sequence of mappings
        One node config per site, e.g. ``{"data-dir": "/data/site-a"}``.
    tls : TLSFiles, optional
        Serve over TLS with these files; ``None`` runs with ``--insecure``.
    auth : AuthKeys, optional
        Turn SuperNode authentication on (``--enable-supernode-auth``, needs
        ``tls``): each site's public key is registered before its SuperNode
        starts with the private key.
    database : bool (default: True)
        Keep the SuperLink's state and message objects in SQLite
        (``--database superlink/state.db``); ``False`` keeps them in memory.
        SQLite waits at most 5 s for its write lock: under heavy concurrent
        uploads on a busy host an upload can fail with "database is locked".
    app_dir : Path (default: the repository root)
        The Flower app ``flwr run`` packs and submits.
    start_timeout : float (default: 60)
        Seconds to wait for the SuperLink to listen and each SuperNode to connect.
    stop_timeout : float (default: 10)
        Seconds between SIGTERM and SIGKILL when stopping a process.
    """

    def __init__(
        self,
        root_dir: str | Path,
        sites: Sequence[Mapping[str, ConfigValue]],
        *,
        tls: TLSFiles | None = None,
        auth: AuthKeys | None = None,
        database: bool = True,
        app_dir: Path = PROJECT_DIR,
        start_timeout: float = 60.0,
        stop_timeout: float = 10.0,
    ) -> None:
        if auth is not None and tls is None:
            raise ValueError("SuperNode authentication needs TLS (tls=TLSFiles(...))")
        if auth is not None and len(auth.private_keys) != len(sites):
            raise ValueError(
                f"{len(sites)} sites but {len(auth.private_keys)} private keys"
            )
        self.root_dir = Path(root_dir).resolve()
        self.sites = [dict(site) for site in sites]
        self.tls, self.auth, self.app_dir = tls, auth, Path(app_dir)
        self.database = database
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.port = 0
        self.superlink: FlowerProcess | None = None
        self.supernodes: list[SuperNode] = []
        self.runs: list[FlowerProcess] = []
        self._left_behind: list[tuple[int, int]] = []
        self._executables = Path(sys.executable).parent

    # -- life cycle -------------------------------------------------------------

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the SuperLink, register keys, start and await every site's node."""
        check_fab_size(self.app_dir)
        self.root_dir.mkdir(parents=True, exist_ok=True)
        self._start_superlink()
        self._write_cli_config()
        keys = self.auth.private_keys if self.auth else [None] * len(self.sites)
        sites = list(zip(self.sites, keys, strict=True))
        for first in range(0, len(sites), STARTING_AT_ONCE):
            batch = [
                self.start_supernode(site, private_key=key)
                for site, key in sites[first : first + STARTING_AT_ONCE]
            ]
            for node in batch:
                node.wait_connected(self.start_timeout)

    def stop(self) -> None:
        """Stop every process started, by PID: runs, SuperNodes, the SuperLink.

        Then whatever a process killed with :meth:`kill` had spawned, if alive.
        """
        stop_processes(self.runs, self.stop_timeout)
        stop_processes(self.supernodes, self.stop_timeout)
        if self.superlink is not None:
            self.superlink.stop(self.stop_timeout)
        for pid, started in self._left_behind:
            kill_if_same(pid, started)

    # -- processes ---------------------------------------------------------------

    def _spawn(
        self,
        name: str,
        command: Sequence[str],
        *,
        flwr_home: Path,
        cwd: Path | None = None,
    ) -> tuple[subprocess.Popen, Path]:
        flwr_home.mkdir(parents=True, exist_ok=True)
        log_path = self.root_dir / f"{name}.log"
        env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(flwr_home)}
        # Flower's helper commands (flower-superexec, flwr-serverapp, ...) are
        # found on PATH: put this environment's first.
        env["PATH"] = f"{self._executables}{os.pathsep}{env.get('PATH', '')}"
        with log_path.open("ab") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            popen = subprocess.Popen(
                list(command),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd or flwr_home,
                # A Ctrl-C in the terminal reaches only the harness, which then
                # stops the processes in order.
                start_new_session=True,
            )
        return popen, log_path

    def _executable(self, name: str) -> str:
        return str(self._executables / name)

    def _start_superlink(self) -> None:
        folder = self.root_dir / "superlink"
        self.port = free_port()
        command = [
            self._executable("flower-superlink"),
            *("--host", HOST, "--port", str(self.port)),
            "--disable-runtime-dependency-installation",
        ]
        if self.database:
            command += ["--database", str(folder / "state.db")]
        if self.tls is None:
            command.append("--insecure")
        else:
            command += [
                *("--ssl-ca-certfile", str(self.tls.ca_certificate)),
                *("--ssl-certfile", str(self.tls.server_certificate)),
                *("--ssl-keyfile", str(self.tls.server_key)),
            ]
        if self.auth is not None:
            command.append("--enable-supernode-auth")
        popen, log_path = self._spawn("superlink", command, flwr_home=folder)
        self.superlink = FlowerProcess("superlink", popen, log_path)
        self._wait_listening()

    def _wait_listening(self) -> None:
        assert self.superlink is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if not self.superlink.running:
                raise RuntimeError(
                    f"the SuperLink exited ({self.superlink.popen.returncode}):\n"
                    f"{self.superlink.tail()}"
                )
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(
            f"the SuperLink did not listen on {HOST}:{self.port} in "
            f"{self.start_timeout} s:\n{self.superlink.tail()}"
        )

    @property
    def address(self) -> str:
        """The SuperLink's address (Fleet, Control and Runtime APIs)."""
        return f"{HOST}:{self.port}"

    @property
    def cli_home(self) -> Path:
        """The CLI's ``FLWR_HOME``, which holds ``config.toml``."""
        return self.root_dir / "cli"

    def _write_cli_config(self) -> None:
        connection: dict[str, ConfigValue] = {"address": self.address}
        if self.tls is None:
            connection["insecure"] = True
        else:
            connection["root-certificates"] = str(self.tls.ca_certificate)
        self.cli_home.mkdir(parents=True, exist_ok=True)
        (self.cli_home / "config.toml").write_text(
            tomli_w.dumps(
                {"superlink": {"default": CONNECTION, CONNECTION: connection}}
            )
        )

    def start_supernode(
        self,
        node_config: Mapping[str, ConfigValue],
        *,
        private_key: Path | None = None,
        register: bool = True,
    ) -> SuperNode:
        """Start one more SuperNode (it is stopped with the deployment).

        With ``private_key`` it authenticates with that key; ``register``
        registers the public key first (``flwr supernode register``), unless the
        SuperLink already knows it. Does not wait: see
        :meth:`SuperNode.wait_connected`.
        """
        index = len(self.supernodes) + 1
        name = f"supernode-{index}"
        folder = self.root_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        port = free_port()
        command = [
            self._executable("flower-supernode"),
            *("--superlink", self.address),
            *("--port", str(port)),
            *(
                "--node-config",
                str(_config_file(folder / "node-config.toml", node_config)),
            ),
        ]
        if self.tls is None:
            command.append("--insecure")
        else:
            command += ["--root-certificates", str(self.tls.ca_certificate)]
        if private_key is not None:
            if register:
                self.register(public_key_path(private_key))
            command += ["--auth-supernode-private-key", str(private_key)]
        popen, log_path = self._spawn(name, command, flwr_home=folder / "home")
        node = SuperNode(name, popen, log_path, node_config, port, private_key)
        self.supernodes.append(node)
        return node

    def restart_supernode(self, node: SuperNode) -> SuperNode:
        """Start a new SuperNode with the config and key of ``node``, which has exited.

        With authentication the SuperLink gives it the same node id, once it has
        marked the old process offline: at once after a clean stop, but only
        after the heartbeat deadline (up to about 60 s) after a SIGKILL.
        """
        if node.running:
            raise RuntimeError(f"{node.name} (PID {node.pid}) is still running")
        return self.start_supernode(
            node.node_config, private_key=node.private_key, register=False
        )

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one process by PID (a SuperNode, a ``flwr-serverapp``).

        What it had spawned is noted first: if that outlives it, :meth:`stop`
        kills it by PID.
        """
        self._left_behind += descendants(pid)
        os.kill(pid, sig)

    def serverapp_pids(self) -> list[int]:
        """Return the PIDs of the ``flwr-serverapp`` processes the SuperLink runs."""
        if self.superlink is None:
            return []
        return [
            pid
            for pid, _ in descendants(self.superlink.pid)
            if any(Path(arg).name == "flwr-serverapp" for arg in command_line(pid)[:2])
        ]

    def process_tree(self) -> list[tuple[int, int]]:
        """Return ``(pid, start time)`` of every live process started, and below.

        After :meth:`stop`, none of them should still be running
        (:func:`still_running`).
        """
        started = [self.superlink, *self.supernodes, *self.runs]
        tree = [entry for entry in self._left_behind if still_running(*entry)]
        for process in started:
            if process is not None and (since := _start_time(process.pid)):
                tree += [(process.pid, since), *descendants(process.pid)]
        return tree

    # -- the CLI -----------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run ``flwr ARGS`` against this deployment; return it with its output."""
        return subprocess.run(
            [self._executable("flwr"), *args],
            env={**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.cli_home)},
            cwd=self.root_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def register(self, public_key: Path) -> int:
        """Register a SuperNode's OpenSSH public key; return the node id it gets."""
        done = self.cli(
            "supernode", "register", str(public_key), CONNECTION, "--format", "json"
        )
        try:
            reply = json.loads(done.stdout)
        except json.JSONDecodeError:
            reply = {}
        if done.returncode != 0 or not reply.get("success"):
            raise RuntimeError(
                f"flwr supernode register {public_key} failed ({done.returncode}):\n"
                f"{done.stdout}\n{done.stderr}"
            )
        return int(reply["node-id"])

    def nodes(self) -> list[dict[str, str]]:
        """Return the SuperLink's list of nodes (``flwr supernode ls``): id, status."""
        done = self.cli("supernode", "ls", CONNECTION, "--format", "json")
        if done.returncode != 0:
            raise RuntimeError(f"flwr supernode ls failed:\n{done.stdout}{done.stderr}")
        return list(json.loads(done.stdout)["nodes"])

    def start_run(self, run_config: Mapping[str, ConfigValue]) -> FlowerProcess:
        """Submit the app with ``flwr run --stream``; return the streaming process.

        ``run_config`` overrides keys of ``[tool.flwr.app.config]``.
        """
        number = len(self.runs) + 1
        config_path = _config_file(
            self.root_dir / f"run-{number}-config.toml", run_config
        )
        command = [
            self._executable("flwr"),
            "run",
            str(self.app_dir),
            CONNECTION,
            "--stream",
            *("--run-config", str(config_path)),
        ]
        popen, log_path = self._spawn(
            f"run-{number}", command, flwr_home=self.cli_home, cwd=self.root_dir
        )
        process = FlowerProcess(f"run-{number}", popen, log_path)
        self.runs.append(process)
        return process

    def run(
        self, run_config: Mapping[str, ConfigValue], *, timeout: float = 600.0
    ) -> subprocess.CompletedProcess:
        """Submit the app and wait for the run to end; return it with its output.

        The return code is ``flwr run``'s: 0 also when the ServerApp died (the
        stream just ends), so check the run's own records as well. Raises
        ``subprocess.TimeoutExpired`` (after stopping the stream) if the run
        takes longer than ``timeout`` s.
        """
        process = self.start_run(run_config)
        try:
            returncode = process.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            process.stop(self.stop_timeout)
            raise
        return subprocess.CompletedProcess(
            process.popen.args, returncode, stdout=process.log()
        )

    # -- diagnosis ---------------------------------------------------------------

    def log_tails(self, lines: int = 30) -> str:
        """Return the end of every process's log, to print when something failed."""
        processes = [self.superlink, *self.supernodes, *self.runs]
        return "\n\n".join(
            f"===== {process.name} (PID {process.pid}, {process.log_path}) =====\n"
            f"{process.tail(lines)}"
            for process in processes
            if process is not None
        )
