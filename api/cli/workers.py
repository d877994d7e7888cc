"""Worker processes: the API's (``flashsale serve --workers N``, ``flashsale up --workers
N``) and the projectors' (``flashsale consume --workers N``, :func:`consumer_workers`, with
the same lifecycle and no port). What follows is said of the API workers.

One port, N processes. The parent binds a socket to the host and port with SO_REUSEPORT and
never listens on it: that holds the port for the whole run (only sockets of this user that
set SO_REUSEPORT too may bind it as well) and turns port 0 into a known free port before any
worker starts. Each worker then opens its own listening socket on that port with
SO_REUSEPORT, and the kernel spreads incoming connections over the listening sockets (one
that does not listen gets none), each worker with its own accept queue.

A worker is ``python -m api.cli.worker``, a fresh interpreter with its own Redis client and
PostgreSQL pool. It reads its :class:`WorkerConfig` (the settings, secrets included) on
stdin, so nothing secret is on a command line or in an environment, and prints one line
on stdout once it listens; the parent reports the service up when every worker has.

Lifecycle:

- SIGTERM or SIGINT to the parent: it sends SIGTERM to every worker, waits for them (SIGKILL
  after :data:`STOP_TIMEOUT_S`) and exits 0. Workers run in a process group of their own,
  so a terminal's Ctrl-C reaches the parent alone and the stop is always the parent's.
- The parent killed outright (SIGKILL, OOM): the kernel kills every worker, which starts
  with ``PR_SET_PDEATHSIG`` (:func:`api.cli.launcher.death_signal_setter`).
- A worker exiting on its own (crash, SIGKILL, OOM): the parent stops the others and exits
  non-zero, naming it. No worker is restarted: a service left at part capacity while it
  looks healthy is worse than one that stops where its supervisor (systemd, Kubernetes)
  sees it and restarts it whole.

Metrics: the parent makes a fresh directory per run and hands it to every worker as
``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client reads it when imported, so it is in the
worker's environment from its start); ``/metrics`` on any worker sums what all of them
wrote. When a worker exits, its live gauges are dropped (``mark_process_dead``); its
counters stay in the sums. The directory is deleted when the parent exits normally.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import multiprocess
from pydantic import BaseModel, ConfigDict

from api.cli.launcher import death_signal_setter
from core.errors import ConfigurationError, FlashsaleError
from core.settings import Settings

__all__ = [
    "CONSUMING_LINE",
    "READY_LINE",
    "STARTUP_TIMEOUT_S",
    "STOP_TIMEOUT_S",
    "ConsumerWorkerConfig",
    "WorkerConfig",
    "WorkerFailed",
    "api_workers",
    "available_cpus",
    "consumer_worker_count",
    "consumer_workers",
    "worker_count",
]

log = structlog.get_logger(__name__)

READY_LINE = b"listening\n"
CONSUMING_LINE = b"consuming\n"
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
# Exit statuses of a worker that stopped as asked: it handled SIGTERM, or it had not yet
# installed its handler (still importing) and the signal ended it.
_STOPPED_AS_ASKED = (0, -signal.SIGTERM)


class WorkerFailed(FlashsaleError):
    """A worker process (API or consumer) exited on its own, or did not start or stop
    cleanly; the others were stopped."""

    code = "worker_failed"


class ChildConfig(BaseModel):
    """What the parent hands every worker process on its stdin: at least its settings."""

    model_config = ConfigDict(frozen=True)

    settings: Settings


class WorkerConfig(ChildConfig):
    """What the parent hands each API worker on its stdin."""

    metrics_dir: str


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and ``taskset``
    narrow), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_count(settings: Settings) -> int:
    """API processes to run: ``FLASHSALE_WORKERS`` (or ``--workers``), else one per CPU."""
    return settings.workers or available_cpus()


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` with SO_REUSEPORT, not listening (see the module
    docstring); port 0 picks a free one."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigurationError("several API workers need SO_REUSEPORT; run with --workers 1")
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _child_setup() -> Callable[[], None]:
    """A worker's ``preexec_fn``: a process group of its own, so that a terminal's Ctrl-C
    reaches the parent alone (a new session would do too, but would also give each worker
    a scheduling autogroup of its own), and death with the parent."""
    die_with_parent = death_signal_setter()

    def setup() -> None:
        os.setpgid(0, 0)
        if die_with_parent is not None:
            die_with_parent()

    return setup


def _describe(code: int) -> str:
    """How a process with exit status ``code`` (negative: the signal) ended."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:  # a real-time signal has no name
        return f"killed by signal {-code}"


@dataclass
class _Workers:
    """The worker processes of one run, as the parent sees them: each runs ``module``, is
    handed its payload on stdin and writes ``ready`` on stdout once it works."""

    kind: str  # "API worker", "consumer worker": how messages and logs name one
    module: str
    payloads: list[bytes]
    ready: bytes
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    #: The multiprocess metrics directory of API workers (their live gauges are dropped
    #: from the sums when they exit).
    metrics_dir: str | None = None
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)
    #: How each worker that exited before the parent asked it to ended, by pid.
    died: dict[int, str] = field(default_factory=dict)
    stopping: bool = False

    async def spawn(self) -> None:
        """Start a worker per payload, each handed its own."""
        for payload in self.payloads:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                self.module,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=self.env,
                preexec_fn=_child_setup(),
            )
            self.processes.append(process)
            assert process.stdin is not None
            process.stdin.write(payload)
            await process.stdin.drain()
            process.stdin.close()

    async def _started(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        if await process.stdout.readline() != self.ready:
            self.died[process.pid] = f"{_describe(await process.wait())} before starting"
            raise WorkerFailed(f"{self.kind} {process.pid} {self.died[process.pid]}")

    async def started(self, stop: asyncio.Event) -> None:
        """Until every worker has said it works, or ``stop`` is set; raise if one exits
        first or they take longer than :data:`STARTUP_TIMEOUT_S`."""
        started = asyncio.gather(*(self._started(p) for p in self.processes))
        stopped = asyncio.ensure_future(stop.wait())
        either: set[asyncio.Future[Any]] = {started, stopped}
        try:
            done, _ = await asyncio.wait(
                either, timeout=STARTUP_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopped.cancel()
        if started in done:
            started.result()  # raises WorkerFailed if a worker exited
            return
        started.cancel()
        with contextlib.suppress(asyncio.CancelledError, WorkerFailed):
            await started
        if not done:
            raise WorkerFailed(f"{self.kind}s did not all start within {STARTUP_TIMEOUT_S:.0f}s")

    async def watch(self, stop: asyncio.Event) -> None:
        """Set ``stop`` as soon as any worker exits while the parent has not asked it to."""
        exits = [asyncio.ensure_future(p.wait()) for p in self.processes]
        try:
            await asyncio.wait(exits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in exits:
                task.cancel()
        if not self.stopping:
            stop.set()

    async def stop(self) -> None:
        """Ask every worker still running to stop, wait for all, SIGKILL any that lingers;
        raise if one had died on its own or did not stop as asked."""
        self.stopping = True
        for process in self.processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):  # exited, not yet reaped
                    process.send_signal(signal.SIGTERM)
            else:
                self.died.setdefault(process.pid, f"{_describe(process.returncode)} on its own")
        failures = [f"{self.kind} {pid} {how}" for pid, how in self.died.items()]
        deadline = asyncio.get_running_loop().time() + STOP_TIMEOUT_S
        for process in self.processes:
            try:
                async with asyncio.timeout_at(deadline):
                    code = await process.wait()
            except TimeoutError:
                process.kill()
                code = await process.wait()
            if self.metrics_dir is not None:
                # Its live gauges (in flight) leave the sums; its counters stay in them.
                multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                    process.pid, self.metrics_dir
                )
            if process.pid not in self.died and code not in _STOPPED_AS_ASKED:
                failures.append(f"{self.kind} {process.pid} {_describe(code)} when asked to stop")
        event = self.kind.lower().replace(" ", "_") + "_died"
        for pid, how in self.died.items():
            log.error(event, pid=pid, how=how)
        if failures:
            others = len(self.processes) - len(self.died)
            stopped = f"; stopped the other {others}" if self.died else ""
            raise WorkerFailed(f"{'; '.join(failures)} (see the log above){stopped}")

    @contextlib.asynccontextmanager
    async def running(self, stop: asyncio.Event) -> AsyncIterator[None]:
        """Start the workers, and stop them all when the block exits (see :meth:`stop`); a
        worker that exits on its own meanwhile sets ``stop``."""
        watcher: asyncio.Future[None] | None = None
        try:
            await self.spawn()
            await self.started(stop)
            watcher = asyncio.ensure_future(self.watch(stop))
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            await self.stop()


@contextlib.asynccontextmanager
async def api_workers(settings: Settings, count: int, stop: asyncio.Event) -> AsyncIterator[int]:
    """Serve the API from ``count`` worker processes on ``settings.port`` (0: a free port)
    until the block exits; yields the port.

    A worker that exits on its own sets ``stop``; leaving the block stops every worker and
    then raises :class:`WorkerFailed` if one had died or did not stop cleanly.
    """
    with (
        reserve_port(settings.host, settings.port) as held,
        tempfile.TemporaryDirectory(prefix="flashsale-metrics-") as metrics_dir,
    ):
        port: int = held.getsockname()[1]
        config = WorkerConfig(
            settings=settings.model_copy(update={"port": port}), metrics_dir=metrics_dir
        )
        workers = _Workers(
            "API worker",
            "api.cli.worker",
            [config.model_dump_json().encode()] * count,
            READY_LINE,
            env=os.environ | {"PROMETHEUS_MULTIPROC_DIR": metrics_dir},
            metrics_dir=metrics_dir,
        )
        async with workers.running(stop):
            if not stop.is_set():
                pids = [p.pid for p in workers.processes]
                log.info("api_listening", host=settings.host, port=port, workers=count, pids=pids)
            yield port


class ConsumerWorkerConfig(ChildConfig):
    """What ``flashsale consume --workers N`` hands each of its processes on stdin."""

    #: Whether this process runs the expiry worker, the stream trimmer and the pruner
    #: beside its projector (one process of the N does).
    upkeep: bool


def consumer_worker_count(settings: Settings) -> int:
    """Projector processes ``consume`` runs: ``FLASHSALE_CONSUMER_WORKERS`` (or
    ``consume --workers``), else one per CPU."""
    return settings.consumer_workers or available_cpus()


@contextlib.asynccontextmanager
async def consumer_workers(
    settings: Settings, count: int, stop: asyncio.Event
) -> AsyncIterator[list[int]]:
    """Run ``count`` consumer processes until the block exits; yields their pids.

    Each runs a projector; they share the partitions through leases
    (:mod:`consumers.leases`). The first also runs the expiry worker, the stream trimmer
    and the pruner, which one process does for all. With ``FLASHSALE_CONSUMER_NAME`` set,
    the processes are named after it (``NAME-0``, ``NAME-1``, ...), so that a restarted
    run resumes each one's pending entries under the same names; else each is host-pid.
    A worker that exits on its own sets ``stop``; leaving the block stops every worker and
    then raises :class:`WorkerFailed` if one had died or did not stop cleanly.
    """
    name = settings.consumer_name
    payloads = [
        ConsumerWorkerConfig(
            settings=settings.model_copy(update={"consumer_name": f"{name}-{i}" if name else None}),
            upkeep=i == 0,
        )
        .model_dump_json()
        .encode()
        for i in range(count)
    ]
    workers = _Workers("consumer worker", "api.cli.consumer_worker", payloads, CONSUMING_LINE)
    async with workers.running(stop):
        pids = [p.pid for p in workers.processes]
        if not stop.is_set():
            log.info("consumer_workers_started", workers=count, pids=pids)
        yield pids
