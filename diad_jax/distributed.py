"""Multi-host start-up: `jax.distributed.initialize` behind a rendezvous with a timeout.

On its own, `jax.distributed.initialize` waits in silence for processes that never start and then
aborts the process (SIGABRT, no message naming them). With an explicit coordinator, process
count and id, `initialize` here first meets the other processes over a plain TCP handshake on
the coordinator's port: process 0 listens there, every other process says who it is, and once all
have, process 0 lets them go, closes the port, and all of them start JAX's distributed runtime
there (its own start then finds everyone up). When `timeout` seconds pass first, every process
that is still waiting stops with a `DistributedStartError` naming the processes that never came
(or, on processes 1.., that the coordinator never answered). With auto-detection (TPU pods, SLURM,
Open MPI: no explicit address) JAX's own start is used, with the same timeout.
"""
from __future__ import annotations

import logging
import socket
import time

import jax

from diad_jax.errors import UserError

log = logging.getLogger(__name__)

_HELLO = b"diad_jax process "


class DistributedStartError(UserError):
    """The processes of a multi-host run did not all start."""


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               timeout: float = 300.0) -> None:
    """`jax.distributed.initialize(coordinator, num_processes, process_id)` once every process has
    arrived, or a DistributedStartError after `timeout` seconds naming the ones missing. Call it
    before anything touches a JAX backend."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes; no effect on GPU/TPU
    explicit = coordinator is not None and num_processes is not None and process_id is not None
    deadline = time.monotonic() + timeout
    if explicit and num_processes > 1:
        if not 0 <= process_id < num_processes:
            raise DistributedStartError(f"{{0}} {process_id} is not in 0..{num_processes - 1}", fields=["process_id"])
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise DistributedStartError(f"{{0}} {coordinator!r}: expected HOST:PORT", fields=["coordinator"])
        log.info("process %d of %d: meeting the others at %s (timeout %.0f s)", process_id, num_processes,
                 coordinator, timeout)
        if process_id == 0:
            _gather(int(port), num_processes, deadline, timeout)
        else:
            _join(host, int(port), process_id, deadline, timeout)
    kw = {k: v for k, v in dict(coordinator_address=coordinator, num_processes=num_processes,
                                process_id=process_id).items() if v is not None}
    jax.distributed.initialize(**kw, initialization_timeout=max(1, int(deadline - time.monotonic())))
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def _gather(port: int, n: int, deadline: float, timeout: float) -> None:
    """Process 0: accept the other n - 1 processes' hellos, then answer "go" to all of them (or name the missing)."""
    arrived: dict[int, socket.socket] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("", port))
        server.listen(n)
        try:
            while len(arrived) < n - 1:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = [i for i in range(1, n) if i not in arrived]
                    _tell(arrived.values(), b"missing " + ",".join(map(str, missing)).encode())
                    raise DistributedStartError(
                        f"distributed start: after {timeout:.0f} s, still waiting for process(es) "
                        f"{', '.join(map(str, missing))} of {n} to start ({{0}}); started: 0"
                        + "".join(f", {i}" for i in sorted(arrived)), fields=["timeout"])
                server.settimeout(min(remaining, 1.0))
                try:
                    conn, _ = server.accept()
                except socket.timeout:
                    continue
                conn.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    line = _read_line(conn)
                except OSError:
                    conn.close()
                    continue
                if not line.startswith(_HELLO) or not line[len(_HELLO):].isdigit():
                    conn.close()  # not one of ours (a port scanner, a stale client): ignore it
                    continue
                pid = int(line[len(_HELLO):])
                if pid in arrived or not 0 < pid < n:
                    conn.sendall(b"error process id %d given twice or out of range\n" % pid)
                    conn.close()
                    continue
                arrived[pid] = conn
            _tell(arrived.values(), b"go")
            for conn in arrived.values():  # the clients close first (their side keeps TIME_WAIT, not this port)
                conn.settimeout(max(1.0, deadline - time.monotonic()))
                try:
                    conn.recv(1)
                except OSError:
                    pass
        finally:
            for conn in arrived.values():
                conn.close()


def _join(host: str, port: int, process_id: int, deadline: float, timeout: float) -> None:
    """Processes 1..: say hello to process 0 (retrying until it listens) and wait for its answer."""
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic())))
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise DistributedStartError(f"distributed start: after {timeout:.0f} s, the coordinator (process 0) "
                                            f"at {host}:{port} never answered ({{0}}); is it started, and is the "
                                            f"address right?", fields=["timeout"]) from None
            time.sleep(0.2)
    with conn:
        conn.sendall(_HELLO + str(process_id).encode() + b"\n")
        conn.settimeout(max(0.1, deadline - time.monotonic() + 5))  # process 0 answers at its own deadline
        try:
            answer = _read_line(conn)
        except OSError:
            answer = b""
    if answer == b"go":
        return
    if answer.startswith(b"missing "):
        raise DistributedStartError(f"distributed start: after {timeout:.0f} s, still waiting for process(es) "
                                    f"{answer[8:].decode().replace(',', ', ')} to start ({{0}})",
                                    fields=["timeout"])
    raise DistributedStartError(f"distributed start: the coordinator at {host}:{port} refused process {process_id}"
                                + (f": {answer[6:].decode()}" if answer.startswith(b"error ") else ""))


def _read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(256)
        if not chunk:
            break
        data += chunk
    return data.strip()


def _tell(conns, message: bytes) -> None:
    for conn in conns:
        try:
            conn.sendall(message + b"\n")
        except OSError:
            pass
