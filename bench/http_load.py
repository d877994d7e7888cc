"""Benchmark: one `flashsale serve` process under wrk, on the three hot endpoints.

Run:  .venv/bin/python -m bench.http_load [--seconds 10] [--rounds 3] [--compare DIR]

Needs FLASHSALE_REDIS_URL and FLASHSALE_DATABASE_URL (real servers; the Redis db is
written to) and wrk (Debian package ``wrk``). Starts the API with ``flashsale serve`` in a
process of its own, opens fresh sales through the admin API, and drives with ``wrk -t2
-c100``:

- ``reserve (stock left)``: POST a reservation, each request carrying the JWT of a
  distinct buyer (tokens precomputed into a file that a wrk Lua script walks through);
- ``reserve (sold out)``: the same on a sale with no stock;
- ``sale view``: GET /v1/sales/{id}.

``--compare DIR`` also serves from the source checkout at DIR (e.g. ``git archive`` of
another commit unpacked there): both servers stay up and each case runs on A and B back to
back, in turn first, every round; it prints the median of each and the median of the
rounds' A/B ratios. Prints figures; asserts nothing about speed.

The reusable pieces (``write_tokens``, ``RESERVE_LUA``, ``run_wrk``, ``Server``,
``serving``, ``free_port``) are what other benchmarks import.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from api.web.auth import issue_token

# Each wrk thread walks its own slice of the token file, so every request is a new buyer.
RESERVE_LUA = """
local tokens = {}
for line in io.lines(os.getenv("BENCH_TOKENS")) do tokens[#tokens + 1] = line end
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
local n = 0
local step = tonumber(os.getenv("BENCH_THREADS") or "2")
request = function()
  local i = (n * step + tid) % #tokens + 1
  n = n + 1
  return wrk.format("POST", wrk.path, {
    ["Authorization"] = "Bearer " .. tokens[i],
    ["Content-Type"] = "application/json",
  }, '{"qty": 1}')
end
"""


@dataclass(frozen=True, slots=True)
class WrkResult:
    """What one wrk run reported."""

    requests_per_second: float
    non_2xx: int
    latency_ms: float


def write_tokens(path: Path, secret: str, count: int) -> None:
    """``count`` buyer JWTs, one a line, each for a distinct user id."""
    with path.open("w") as out:
        for i in range(count):
            out.write(issue_token(secret, f"buyer-{i}") + "\n")


def run_wrk(
    url: str,
    seconds: int,
    *,
    lua: Path | None = None,
    env: dict[str, str] | None = None,
    threads: int = 2,
    connections: int = 100,
) -> WrkResult:
    """One ``wrk -t{threads} -c{connections} -d{seconds}s`` run against ``url``."""
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if lua is not None:
        command += ["-s", str(lua)]
    run_env = {**os.environ, **(env or {}), "BENCH_THREADS": str(threads)}
    out = subprocess.run([*command, url], capture_output=True, text=True, env=run_env, check=True)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    if rate is None:
        raise RuntimeError(f"wrk printed no rate:\n{out.stdout}\n{out.stderr}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out.stdout)
    latency = re.search(r"Latency\s+([\d.]+)(us|ms|s)", out.stdout)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    return WrkResult(
        requests_per_second=float(rate.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        latency_ms=float(latency.group(1)) * scale[latency.group(2)] if latency else 0.0,
    )


class Server:
    """A ``flashsale serve`` process started from the source checkout ``source``."""

    def __init__(self, source: Path, env: dict[str, str], port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.admin_token = env["FLASHSALE_ADMIN_TOKEN"]
        self._process = subprocess.Popen(
            [sys.executable, "-m", "api.cli.main", "serve", "--port", str(port)],
            cwd=source,
            env={**os.environ, **env, "PYTHONPATH": str(source)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.base}/readyz", timeout=1):
                    return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("the API did not become ready")

    def create_sale(self, stock: int) -> str:
        """Open a sale with ``stock`` units (one per buyer) now; its id."""
        sale_id = f"bench-{uuid.uuid4().hex[:10]}"
        body = json.dumps({"sale_id": sale_id, "stock": stock, "per_user_limit": 1}).encode()
        request = urllib.request.Request(
            f"{self.base}/v1/sales",
            data=body,
            headers={
                "Authorization": f"Bearer {self.admin_token}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=5):
            return sale_id

    def stop(self) -> None:
        """SIGTERM, then wait."""
        self._process.terminate()
        self._process.wait(timeout=20)


@contextmanager
def serving(source: Path, env: dict[str, str], port: int) -> Iterator[Server]:
    """A running ``Server`` for the block."""
    server = Server(source, env, port)
    try:
        yield server
    finally:
        server.stop()


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


CASES = ("reserve (stock left)", "reserve (sold out)", "sale view")


def case_url(server: Server, case: str) -> tuple[str, bool]:
    """The URL that ``case`` drives on ``server`` (a fresh sale each time), and whether
    it is a reservation (each request a new buyer)."""
    if case == "sale view":
        return f"{server.base}/v1/sales/{server.create_sale(10)}", False
    stock = 10**9 if case == "reserve (stock left)" else 0
    return f"{server.base}/v1/sales/{server.create_sale(stock)}/reservations", True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare", type=Path, help="also serve from this source checkout (B)")
    parser.add_argument("--tokens", type=int, default=200_000, help="distinct buyers")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed (Debian package wrk)")
    for name in ("FLASHSALE_REDIS_URL", "FLASHSALE_DATABASE_URL"):
        if not os.environ.get(name):
            parser.error(f"set {name}")
    env = {
        "FLASHSALE_ADMIN_TOKEN": secrets.token_urlsafe(24),
        "FLASHSALE_JWT_SECRET": secrets.token_urlsafe(32),
        "FLASHSALE_LOG_LEVEL": "warning",
    }
    sources = {"A": Path(__file__).resolve().parent.parent}
    if args.compare is not None:
        sources["B"] = args.compare.resolve()
    rates: dict[tuple[str, str], list[float]] = {}
    ratios: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as servers:
        tokens, lua = Path(tmp) / "tokens.txt", Path(tmp) / "reserve.lua"
        write_tokens(tokens, env["FLASHSALE_JWT_SECRET"], args.tokens)
        lua.write_text(RESERVE_LUA)
        # Every server stays up; each case runs on them back to back (in turn first), so
        # that a ratio compares runs minutes apart at most on a machine whose speed drifts.
        up = {
            label: servers.enter_context(serving(source, env, free_port()))
            for label, source in sources.items()
        }
        for round_ in range(args.rounds):
            for case in CASES:
                got: dict[str, float] = {}
                labels = list(up) if round_ % 2 == 0 else list(reversed(up))
                for label in labels:
                    url, reserving = case_url(up[label], case)
                    result = run_wrk(
                        url,
                        args.seconds,
                        lua=lua if reserving else None,
                        env={"BENCH_TOKENS": str(tokens)},
                    )
                    got[label] = result.requests_per_second
                    rates.setdefault((label, case), []).append(result.requests_per_second)
                    print(
                        f"round {round_ + 1} {label} {case}: "
                        f"{result.requests_per_second:,.0f} req/s, "
                        f"mean latency {result.latency_ms:.1f} ms, "
                        f"non-2xx {result.non_2xx}",
                        flush=True,
                    )
                if "B" in got:
                    ratios.setdefault(case, []).append(got["A"] / got["B"])
    print(f"\nmedians of {args.rounds} rounds (wrk -t2 -c100 -d{args.seconds}s):")
    for case in CASES:
        line = f"  {case}: " + ", ".join(
            f"{label} {statistics.median(rates[label, case]):,.0f} req/s" for label in sources
        )
        if case in ratios:
            line += f", A/B {statistics.median(ratios[case]):.2f}x (median of the rounds' ratios)"
        print(line)


if __name__ == "__main__":
    main()
