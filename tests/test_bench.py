"""The benchmarks run to the end against real servers and print their figures (a short run:
their speed is not asserted, only that every part of them works)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

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


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_http_load_drives_each_endpoint_with_wrk_and_prints_medians(settings: Settings) -> None:
    args = ("--seconds", "1", "--rounds", "1", "--tokens", "50")
    out = run_bench("bench.http_load", settings, *args)
    for case in ("reserve (stock left)", "reserve (sold out)", "sale view"):
        assert f"round 1 A {case}: " in out, out
        assert any(line.startswith(f"  {case}: A ") for line in out.splitlines()), out
