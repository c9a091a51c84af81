"""The benchmark harness and the plots run end to end (on the CPU, with the reference backend).

Part of the suite so CI proves `nox -s bench` / `nox -s plots` work; it runs once, in the
reference backend's session, since the harness does not depend on the backend under test.
"""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest


def test_bench_and_plots_run_on_cpu(backend_name, tmp_path):
    if backend_name != "reference":
        pytest.skip("the harness is backend-independent: checked in the reference session")
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (fused3d[plots])")
    command = [sys.executable, "-m", "fused3d.bench", "--device", "cpu", "--backends",
               "reference", "--baselines", "eager", "--batches", "1", "--precisions", "fp32",
               "--cudagraphs", "reference", "--out", str(tmp_path)]
    subprocess.run(command, check=True, timeout=600)
    rows = list(csv.DictReader((tmp_path / "bench_cpu.csv").open()))
    assert {(r["implementation"], r["mode"]) for r in rows} == {
        (i, m) for i in ("eager", "reference", "reference+cudagraphs")
        for m in ("forward", "forward+backward")}
    # CUDA-graph rows are recorded as unavailable on the CPU, with the reason; the rest ran.
    graphed = [r for r in rows if r["implementation"] == "reference+cudagraphs"]
    assert all(r["status"] == "unavailable" and "CUDA device" in r["message"] for r in graphed)
    timed = [r for r in rows if r not in graphed]
    assert all(r["status"] == "ok" and float(r["median_ms"]) > 0 for r in timed)
    subprocess.run([sys.executable, "-m", "fused3d.bench.plots", "--data",
                    str(tmp_path / "bench_cpu.csv")], check=True, timeout=600)
    for figure in ("time", "scaling"):
        assert (tmp_path / f"bench_cpu_{figure}.png").stat().st_size > 0
        assert (tmp_path / f"bench_cpu_{figure}.svg").stat().st_size > 0
