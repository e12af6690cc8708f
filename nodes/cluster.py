"""LocalCluster: a coordinator and N partition-owner nodes as child processes on this machine.

Used by ``bus up``, by the tests and by the benchmarks. Children get PR_SET_PDEATHSIG, so they die with
the process that started them even if it is killed; ``stop()`` asks them to stop (SIGTERM) and kills
what has not stopped by the deadline. Every child is waited for: no zombies, no strays.

Layout under ``data_dir``: ``coordinator/`` and ``node-<id>/`` (LMDB environments), ``logs/``.
"""

from __future__ import annotations

import ctypes
import os
import queue
import random
import signal
import socket
import subprocess
import tempfile
import sys
import threading
import time

from bus import wire
from bus.connection import Requester

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PR_SET_PDEATHSIG = 1


# Ports for a cluster's processes are picked below the kernel's ephemeral range: a port the kernel handed
# out by bind(0) is also what it hands out as the local end of every outgoing connection, so in the second
# or so between choosing it and the child binding it, any connect on the machine (another test's client)
# could take it. Below the range, only someone binding that very port can.
PORTS_BELOW_EPHEMERAL = 8_000  # how many ports below the ephemeral range are candidates
_EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


def _candidate_ports() -> range:
    try:
        with open(_EPHEMERAL_RANGE_FILE) as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32_768  # Linux's default
    return range(max(1_024, low - PORTS_BELOW_EPHEMERAL), low)


# Two processes choosing at once (two test workers) could both find a port free and both hand it out. A
# port handed out is therefore leased for PORT_LEASE_S, by a file created exclusively in PORT_LEASE_DIR,
# so no other process on the machine hands it out again meanwhile (by then the child has bound it).
PORT_LEASE_DIR = os.path.join(tempfile.gettempdir(), "bus-port-leases")
PORT_LEASE_S = 120.0


def _lease(port: int) -> bool:
    """Take ``port``'s lease: True unless another process holds it (one younger than PORT_LEASE_S)."""
    path = os.path.join(PORT_LEASE_DIR, str(port))
    try:
        if time.time() - os.stat(path).st_mtime > PORT_LEASE_S:
            os.unlink(path)  # expired: its holder has long bound the port or gone
    except FileNotFoundError:
        pass
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        return False


def free_port_block(count: int, host: str = "127.0.0.1", attempts: int = 200) -> int:
    """A base port such that base .. base+count-1 are all free now and leased to this process (see
    PORT_LEASE_S), chosen at random below the ephemeral range (see PORTS_BELOW_EPHEMERAL)."""
    candidates = _candidate_ports()
    rng = random.SystemRandom()
    os.makedirs(PORT_LEASE_DIR, exist_ok=True)
    for _ in range(attempts):
        base = rng.randrange(candidates.start, candidates.stop - count + 1)
        if not all(_lease(port) for port in range(base, base + count)):
            continue  # another process's (the ports leased so far expire with the rest)
        held = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                held.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no block of {count} free ports in {candidates.start}-{candidates.stop - 1}")


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that are free now (one block)."""
    base = free_port_block(count, host)
    return list(range(base, base + count))


def _die_with_parent():  # runs in the child between fork and exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process. A node restarted
# from a short-lived thread (a test's fault injector) would get SIGTERM the moment that thread ended. So
# every child is forked by this one spawner thread, which lives as long as the process.
_spawn_requests: "queue.Queue | None" = None
_spawn_lock = threading.Lock()


def _spawner_loop(requests) -> None:
    while True:
        kwargs, box, done = requests.get()
        try:
            box.append(subprocess.Popen(**kwargs))
        except BaseException as exc:  # handed to the caller
            box.append(exc)
        done.set()


def _popen(**kwargs) -> subprocess.Popen:
    global _spawn_requests
    with _spawn_lock:
        if _spawn_requests is None:
            _spawn_requests = queue.Queue()
            threading.Thread(target=_spawner_loop, args=(_spawn_requests,), name="cluster-spawner",
                             daemon=True).start()
    box, done = [], threading.Event()
    _spawn_requests.put((kwargs, box, done))
    done.wait()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


class ClusterInUse(RuntimeError):
    """A port or data directory of the cluster is taken by another process."""


class LocalCluster:
    def __init__(self, data_dir: str, nodes: int = 3, *, port: int = 0, host: str = "127.0.0.1",
                 sync: str = "always", node_args: tuple = (), coordinator_args: tuple = (),
                 env: dict | None = None, advertise: dict | None = None,
                 node_command: tuple = ("-m", "nodes.node"), coordinator_command: tuple = ("-m", "nodes.coordinator"),
                 metrics_port: int | None = None, coordinator_for: dict | None = None, kafka_port: int | None = None):
        assert nodes >= 1
        self.data_dir = os.path.abspath(data_dir)
        self.host = host
        self.sync = sync
        self.node_args, self.coordinator_args = tuple(node_args), tuple(coordinator_args)
        # How a child is started (the interpreter's arguments before the process's own): the fault harness
        # starts builds of its own through a test entry point.
        self.node_command, self.coordinator_command = tuple(node_command), tuple(coordinator_command)
        # Prometheus metrics: the coordinator on metrics_port, node i on metrics_port + i (None: not served).
        self.metrics_port = metrics_port
        # Kafka's protocol (docs/kafka.md): the coordinator on kafka_port, node i on kafka_port + i; 0 picks free
        # ports; None: no Kafka listeners.
        if kafka_port == 0:
            kafka_ports = free_ports(nodes + 1, host)
        elif kafka_port is not None:
            kafka_ports = list(range(kafka_port, kafka_port + nodes + 1))
        else:
            kafka_ports = []
        self.kafka_ports = dict(zip(range(nodes + 1), kafka_ports))  # 0: the coordinator; i: node i
        # node id -> the address a node tells clients instead of its bind address (e.g. a fault proxy's)
        self.advertise = dict(advertise or {})
        # node id -> the address it reaches the coordinator at instead of the bootstrap (e.g. a fault proxy's)
        self.coordinator_for = dict(coordinator_for or {})
        ports = list(range(port, port + nodes + 1)) if port else free_ports(nodes + 1, host)
        self.coordinator_port, self.node_ports = ports[0], dict(zip(range(1, nodes + 1), ports[1:]))
        self.bootstrap = f"tcp://{host}:{self.coordinator_port}"
        self.env = {**os.environ, **(env or {})}
        self.env["PYTHONPATH"] = REPO_ROOT + os.pathsep + self.env.get("PYTHONPATH", "")
        self.coordinator: subprocess.Popen | None = None
        self.nodes: dict[int, subprocess.Popen] = {}
        self.log_dir = os.path.join(self.data_dir, "logs")
        # Where each process's log stood when this cluster last started it: logs are appended to across runs,
        # and an error should show this run's lines, not an earlier one's.
        self._log_starts: dict[str, int] = {}
        os.makedirs(self.log_dir, exist_ok=True)

    # -- processes ---------------------------------------------------------------------------------

    def log_path(self, name: str) -> str:
        return os.path.join(self.log_dir, f"{name}.log")

    def _spawn(self, name: str, argv: list) -> subprocess.Popen:
        log_path = self.log_path(name)
        with open(log_path, "ab") as log_file:
            self._log_starts[name] = log_file.tell()
            return _popen(args=[sys.executable, *argv], env=self.env, stdout=log_file, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, cwd=self.data_dir)

    def node_address(self, node_id: int) -> str:
        return f"tcp://{self.host}:{self.node_ports[node_id]}"

    def start_coordinator(self) -> None:
        assert self.coordinator is None or self.coordinator.poll() is not None
        self.coordinator = self._spawn("coordinator", [
            *self.coordinator_command, "--data-dir", os.path.join(self.data_dir, "coordinator"),
            "--bind", self.bootstrap, *self._metrics_args(0), *self._kafka_args(0), *self.coordinator_args])

    def start_node(self, node_id: int) -> None:
        current = self.nodes.get(node_id)
        assert current is None or current.poll() is not None, f"node {node_id} is running"
        self.nodes[node_id] = self._spawn(f"node-{node_id}", [
            *self.node_command, "--node-id", str(node_id), "--data-dir", os.path.join(self.data_dir, f"node-{node_id}"),
            "--bind", self.node_address(node_id), "--coordinator", self.coordinator_for.get(node_id, self.bootstrap),
            "--sync", self.sync,
            *(("--advertise", self.advertise[node_id]) if node_id in self.advertise else ()),
            *self._metrics_args(node_id), *self._kafka_args(node_id), *self.node_args])

    def _metrics_args(self, offset: int) -> tuple:
        if self.metrics_port is None:
            return ()
        return ("--metrics-port", str(self.metrics_port + offset), "--metrics-addr", self.host)

    def _kafka_args(self, index: int) -> tuple:
        if index not in self.kafka_ports:
            return ()
        return ("--kafka-listen", self.kafka_address(index))

    def kafka_address(self, index: int = 0) -> str:
        """HOST:PORT of the Kafka listener of the coordinator (0) or of node ``index``."""
        return f"{self.host}:{self.kafka_ports[index]}"

    @property
    def kafka_bootstrap(self) -> str | None:
        """What a Kafka client's bootstrap.servers is (the coordinator's listener), or None without them."""
        return self.kafka_address(0) if self.kafka_ports else None

    def metrics_url(self, name: str) -> str | None:
        """Where ``name`` ("coordinator" or "node-<id>") serves its metrics, if it does."""
        if self.metrics_port is None:
            return None
        offset = 0 if name == "coordinator" else int(name.split("-")[1])
        return f"http://{self.host}:{self.metrics_port + offset}/metrics"

    def check_free(self) -> None:
        """Raise ClusterInUse, saying which, if a port or a data directory of this cluster is taken (another
        cluster running there): starting anyway would find the other cluster's processes answering."""
        metrics = [] if self.metrics_port is None else [self.metrics_port + i for i in range(len(self.node_ports) + 1)]
        kafka = list(self.kafka_ports.values())
        for port in [self.coordinator_port, *self.node_ports.values(), *metrics, *kafka]:
            with socket.socket() as probe:
                try:
                    probe.bind((self.host, port))
                except OSError:
                    option = "--metrics-port" if port in metrics else "--kafka-port" if port in kafka else "--port"
                    raise ClusterInUse(f"port {port} on {self.host} is in use (another `bus up`?); stop it, or "
                                       f"choose other ports with {option}") from None
        from store.dir_lock import lock_data_dir, unlock_data_dir

        for name in ["coordinator", *(f"node-{n}" for n in self.node_ports)]:
            path = os.path.join(self.data_dir, name)
            try:
                unlock_data_dir(lock_data_dir(path))
            except Exception as exc:
                raise ClusterInUse(f"data directory {path} is in use: {exc}") from None

    def start(self, timeout_s: float = 30.0) -> "LocalCluster":
        self.start_coordinator()
        for node_id in self.node_ports:
            self.start_node(node_id)
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 30.0, node_ids=None) -> None:
        """Wait until the coordinator answers and sees every node (or ``node_ids``) alive."""
        wanted = set(self.node_ports if node_ids is None else node_ids)
        deadline_s = time.monotonic() + timeout_s
        import zmq

        context = zmq.Context()
        requester = Requester(context, self.bootstrap, 1_000)
        try:
            while True:
                self._check_children()
                try:
                    nodes = requester.metadata().nodes
                    if all(nodes.get(n, {}).get("alive") for n in wanted):
                        self._check_children()  # ours, not another cluster's on the same ports
                        return
                except Exception:
                    pass
                if time.monotonic() > deadline_s:
                    raise TimeoutError(f"cluster not ready within {timeout_s} s; see {self.log_dir}")
                time.sleep(0.05)
        finally:
            requester.close()
            context.term()

    def _check_children(self) -> None:
        for name, proc in [("coordinator", self.coordinator), *((f"node-{n}", p) for n, p in self.nodes.items())]:
            if proc is not None and proc.poll() is not None and proc.returncode not in (0, -9, -15, -19):
                tail = self.log_tail(name)
                raise RuntimeError(f"{name} exited with {proc.returncode} (log: {self.log_path(name)}):\n{tail}")

    def log_tail(self, name: str, lines: int = 20) -> str:
        """The last ``lines`` lines ``name`` logged since this cluster last started it."""
        try:
            with open(self.log_path(name), "rb") as f:
                f.seek(self._log_starts.get(name, 0))
                return "".join(f.read().decode(errors="replace").splitlines(keepends=True)[-lines:])
        except OSError:
            return ""

    # -- faults ------------------------------------------------------------------------------------

    def kill_node(self, node_id: int, sig: int = signal.SIGKILL) -> None:
        proc = self.nodes[node_id]
        proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            proc.wait(10)

    def restart_node(self, node_id: int, timeout_s: float = 30.0) -> None:
        if self.nodes[node_id].poll() is None:
            self.kill_node(node_id)
        self.start_node(node_id)
        self.wait_ready(timeout_s, [node_id])
        # The coordinator may still count the killed incarnation as alive (its session has not run out),
        # so also wait for the new process itself to answer.
        self.wait_serving(node_id, timeout_s)

    def wait_serving(self, node_id: int, timeout_s: float = 30.0) -> None:
        """Wait until node ``node_id``'s process answers a ping on its own address."""
        import zmq

        deadline_s = time.monotonic() + timeout_s
        context = zmq.Context()
        requester = Requester(context, self.node_address(node_id), 500)
        try:
            while True:
                self._check_children()
                try:
                    requester.request(self.node_address(node_id), wire.PING, {})
                    return
                except Exception:
                    pass
                if time.monotonic() > deadline_s:
                    raise TimeoutError(f"node {node_id} not serving within {timeout_s} s; see {self.data_dir}/logs")
        finally:
            requester.close()
            context.term()

    def pause_node(self, node_id: int) -> None:
        self.nodes[node_id].send_signal(signal.SIGSTOP)

    def resume_node(self, node_id: int) -> None:
        self.nodes[node_id].send_signal(signal.SIGCONT)

    def kill_coordinator(self, sig: int = signal.SIGKILL) -> None:
        self.coordinator.send_signal(sig)
        self.coordinator.wait(10)

    def restart_coordinator(self, timeout_s: float = 30.0) -> None:
        if self.coordinator.poll() is None:
            self.kill_coordinator()
        self.start_coordinator()
        self.wait_ready(timeout_s)

    def pids(self) -> dict:
        out = {"coordinator": self.coordinator.pid if self.coordinator else None}
        out.update({f"node-{n}": p.pid for n, p in self.nodes.items()})
        return out

    # -- shutdown ----------------------------------------------------------------------------------

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every child (SIGCONT first, in case it is paused), wait, SIGKILL the stragglers."""
        procs = [p for p in [*self.nodes.values(), self.coordinator] if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        deadline_s = time.monotonic() + timeout_s
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline_s - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
