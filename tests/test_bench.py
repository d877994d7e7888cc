"""The benchmarks run to the end against real servers and print their figures (a short run:
their speed is not asserted, only that every part of them works)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from bench.load import run_load
from bench.projection import BASELINE as PROJECTION_BASELINE
from bench.servers import Secrets, baselines
from bench.wrk import WRK, run_wrk
from core.settings import Settings
from tests.daemons import env_for


def run_bench(module: str, settings: Settings, *args: str) -> str:
    env = env_for(settings.redis_url or "", settings.database_url or "")
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.single_redis(reason="the benchmarks measure one server, with plain clients")
def test_bench_reserve_runs_its_http_part_to_the_end(settings: Settings) -> None:
    out = run_bench(
        "bench.bench_reserve",
        settings,
        "--clients",
        "4",
        "--seconds",
        "0.2",
        "--http-requests",
        "20",
    )
    lines = out.splitlines()
    assert any(line.startswith("reserve.lua placements: ") for line in lines), out
    assert any(line.startswith("reserve.lua sold-out refusals: ") for line in lines), out
    placed = [line for line in lines if line.startswith("http (all placed): ")]
    sold_out = [line for line in lines if line.startswith("http (all sold out): ")]
    assert len(placed) == 1 and "over 20 requests" in placed[0], out
    assert placed[0].endswith("statuses [202]"), out
    assert len(sold_out) == 1 and sold_out[0].endswith("statuses [409]"), out


BENCH_ROWS = (
    "POST reservation, stock left",
    "POST reservation, sold out",
    "GET /v1/sales/{id}",
    "projection into PostgreSQL",
    "202 -> order row in PostgreSQL",
)


@pytest.mark.single_redis(reason="the benchmarks measure one server, with plain clients")
def test_bench_suite_quick_run_prints_every_row_without_errors(
    settings: Settings, redis_client: aioredis.Redis, pool: asyncpg.Pool
) -> None:
    out = run_bench("bench", settings, "--quick", "--markdown")
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ")]
    assert rows[0][0] == "| endpoint", out
    by_endpoint = {row[0].removeprefix("| "): row for row in rows[1:]}
    assert sorted(by_endpoint) == sorted(BENCH_ROWS), out
    assert "ERROR" not in out, out
    for endpoint in BENCH_ROWS[:3]:
        row = by_endpoint[endpoint]
        processes, baseline, base_rate, our_rate, ratio = row[1:6]
        assert processes == "1", out
        assert baseline in ("aiohttp hello", "aiohttp + json + one EVALSHA"), out
        assert float(base_rate.replace(",", "")) > 0 and float(our_rate.replace(",", "")) > 0, out
        assert ratio.endswith("x"), out
    for endpoint in BENCH_ROWS[3:]:
        figure = by_endpoint[endpoint][4]
        assert figure == "not available" or "events/s" in figure or "p99" in figure, out
    # The projection is held against its bare baseline, one COPY of as many rows.
    projection = by_endpoint["projection into PostgreSQL"]
    if "events/s" in projection[4]:
        baseline, copied, ratio = projection[2], projection[3], projection[5]
        assert baseline == PROJECTION_BASELINE, out
        assert float(copied.replace(",", "")) > 0, out
        assert ratio.endswith("x") and float(ratio.removesuffix("x")) > 0, out
    loader = "load: wrk -t2 -c100 -d1s" if WRK else "load: own aiohttp load generator"
    assert loader in out, out


@pytest.mark.parametrize("loader", ["wrk", "own"])
def test_bench_loaders_count_every_answer_by_status(loader: str, tmp_path: Path) -> None:
    if loader == "wrk" and not WRK:
        pytest.skip("wrk is not installed")
    run = run_wrk if loader == "wrk" else run_load
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("a\nb\nc\n")
    with (
        tmp_path.joinpath("log").open("wb") as log,
        baselines("hello", "", Secrets.random(), 2, "", log) as base,
    ):
        result = run(base + "/x", "POST", '{"qty":1}', tokens, 2, 8, 1.0)
    assert result.requests > 0 and set(result.statuses) == {200}
    assert result.problem(200) is None
    # A run answered with anything but the expected status is reported, not timed.
    assert result.problem(202) == f"expected 202, got {result.requests} x 200"
    assert 0 < result.p50_ms <= result.p99_ms


@pytest.mark.single_redis(reason="the benchmarks measure one server, with plain clients")
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_http_load_drives_each_endpoint_with_wrk_and_prints_medians(settings: Settings) -> None:
    args = ("--seconds", "1", "--rounds", "1", "--tokens", "50")
    out = run_bench("bench.http_load", settings, *args)
    for case in ("reserve (stock left)", "reserve (sold out)", "sale view"):
        assert f"round 1 A {case}: " in out, out
        assert any(line.startswith(f"  {case}: A ") for line in out.splitlines()), out
