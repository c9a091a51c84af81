"""Benchmark harness and plots for fused3d (DESIGN section 10).

``python -m fused3d.bench`` times eager :class:`fused3d.Model`, ``torch.compile`` of it and every
available fused3d backend in one process on one device, checks each against a float64 oracle
before timing it, and writes a tidy CSV/JSON under ``plots/``. ``python -m fused3d.bench.plots``
draws the figures from that file (matplotlib, no GPU needed).

The modules: :mod:`.problem` (the benchmark problem, precisions, floors), :mod:`.timing`
(CUDA-event timing with L2 flush, statistics), :mod:`.oracle` (float64 correctness checks),
:mod:`.harness` (the run loop and result files), :mod:`.plots` (figures).
"""

from __future__ import annotations

__all__ = ["harness", "oracle", "plots", "problem", "timing"]
