"""Figures from the benchmark data: ``python -m fused3d.bench.plots [--data plots/bench_cuda.csv]``.

Reads the tidy CSV written by ``python -m fused3d.bench`` (no GPU, no torch needed beyond the
package import) and writes, beside the data, PNG + SVG of:

- ``<stem>_time``: time per implementation at the benchmark batch, forward and training step,
  per precision, with speedups over eager and torch.compile;
- ``<stem>_scaling``: time against batch (log-log);
- ``<stem>_memory``: extra peak memory of forward+backward;
- ``<stem>_roofline``: share of the forward floor of DESIGN section 7 reached (GPU data only);
- ``<stem>_table.md``: the benchmark-batch numbers as a markdown table.

Each figure holds one device (rows are split by device and GPU name, never mixed) and is titled
with the device, date and commit of the run.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Iterable
from pathlib import Path

FORWARD, TRAINING = "forward", "forward+backward"
MODE_TITLES = {FORWARD: "forward (no grad)", TRAINING: "training step (forward + backward)"}
PRECISION_TITLES = {"tf32": "float32, TF32 on", "fp32": "float32, TF32 off (IEEE)",
                    "bf16": "bfloat16"}
BASELINE_ORDER = ("eager", "compile", "compile-max-autotune")
BASELINE_COLORS = {"eager": "#7f7f7f", "compile": "#4a4a4a", "compile-max-autotune": "#b0b0b0"}
BACKEND_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")
BENCHMARK_BATCH = 16
MEMORY_TARGET_MIB = 80.0
NOT_HERE = ("unavailable", "unsupported")
FAILED = ("failed-check", "error", "oom")
BASELINE_STYLES = {"eager": "--", "compile": "-.", "compile-max-autotune": ":"}
NUMERIC = ("batch", "median_ms", "p10_ms", "p25_ms", "p75_ms", "p90_ms", "min_ms", "mean_ms",
           "reps", "peak_extra_mib", "speedup_vs_eager", "speedup_vs_compile", "floor_ms",
           "percent_of_floor", "check_error", "check_tolerance", "first_call_s")


def load_rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key in NUMERIC:
            value = row.get(key, "")
            try:
                row[key] = float(value) if value not in ("", None) else None
            except ValueError:
                row[key] = None
        if row["batch"] is not None:
            row["batch"] = int(row["batch"])
    return rows


def split_by_device(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row.get("device", ""), row.get("gpu", "")), []).append(row)
    return groups


def implementation_order(rows: list[dict]) -> list[str]:
    """Baselines first, then backends by name; backends that never ran here are left out
    (the figures name them in a footnote)."""
    names = list(dict.fromkeys(r["implementation"] for r in rows
                               if r["status"] not in NOT_HERE))
    baselines = [n for n in BASELINE_ORDER if n in names]
    return baselines + sorted(n for n in names if n not in BASELINE_ORDER)


def colors_for(names: list[str]) -> dict[str, str]:
    colors, backend_index = {}, 0
    for name in names:
        if name in BASELINE_COLORS:
            colors[name] = BASELINE_COLORS[name]
        else:
            colors[name] = BACKEND_COLORS[backend_index % len(BACKEND_COLORS)]
            backend_index += 1
    return colors


def _present(rows: list[dict], key: str, order: Iterable[str], ok_only: bool = True) -> list[str]:
    """Values of ``key`` in ``order`` (then any others), only those with a timed row unless
    ``ok_only`` is False: a panel where nothing was timed is left out."""
    seen = {r[key] for r in rows if r["status"] == "ok" or not ok_only}
    return [v for v in order if v in seen] + sorted(seen - set(order))


def _title(what: str, rows: list[dict]) -> str:
    first = rows[0]
    device = first.get("gpu") or first.get("device")
    if first.get("device") == "cpu":
        device = "CPU"
    dates = sorted({r.get("date", "")[:10] for r in rows if r.get("date")})
    commits = sorted({r.get("git_commit", "") for r in rows if r.get("git_commit")})
    spatial = first.get("spatial", "")
    size = f"C_in {first.get('in_channels')}, C_out {first.get('out_channels')}, DHW {spatial}"
    return (f"fused3d: {what}\n{device} | {', '.join(dates)} | commit {', '.join(commits)} | "
            f"torch {first.get('torch')} | {size}")


def _short(reason: str, limit: int = 70) -> str:
    reason = reason.split(";")[0].strip()
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def _footnote(fig, rows: list[dict]) -> None:
    """Name what could not run on this machine (with its first reason) and what failed."""
    missing = {}
    for row in rows:
        if row["status"] in NOT_HERE:
            missing.setdefault(row["implementation"], row.get("message", ""))
    ran = {r["implementation"] for r in rows if r["status"] not in NOT_HERE}
    notes = [f"{name} ({_short(reason)})" for name, reason in sorted(missing.items())
             if name not in ran]
    lines = ["not available here: " + "; ".join(notes)] if notes else []
    failed = [f"{r['implementation']} {r['mode']} {r['precision']} b{r['batch']}: {r['status']}"
              for r in rows if r["status"] in FAILED]
    if failed:
        more = f" (+{len(failed) - 8} more, see the CSV)" if len(failed) > 8 else ""
        lines.append("not timed: " + "; ".join(failed[:8]) + more)
    skipped: dict[str, int] = {}
    for row in rows:
        if row["status"] == "skipped":
            reason = _short(row.get("message", ""), 50)
            skipped[reason] = skipped.get(reason, 0) + 1
    if skipped:
        lines.append("skipped: " + "; ".join(f"{n} points ({reason})"
                                             for reason, n in skipped.items()))
    if lines:
        fig.text(0.01, -0.01, "\n".join(lines), fontsize=7, va="top", ha="left",
                 color="#555555")


def _y_axis(ax, always_log: bool = False) -> None:
    """Log y with plain-number labels; linear when the data span less than a decade (a log
    axis then shows only scientific minor labels)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    low, high = ax.dataLim.y0, ax.dataLim.y1
    if not always_log and low > 0 and high / low < 10:
        ax.set_ylim(0, high * 1.1)
        return
    ax.set_yscale("log")
    decades = math.log10(high / low) if low > 0 and high > 0 else 3
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0,) if decades > 3 else
                                          (1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _batch_axis(ax, rows: list[dict]) -> None:
    """Log2 batch axis labelled with the batches that were run."""
    batches = sorted({r["batch"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.set_xlabel("batch", fontsize=8)


def _benchmark_batch(rows: list[dict]) -> int:
    batches = sorted({r["batch"] for r in rows if r["status"] == "ok"} or
                     {r["batch"] for r in rows})
    return BENCHMARK_BATCH if BENCHMARK_BATCH in batches else batches[-1]


def _save(fig, out_base: Path) -> list[Path]:
    written = []
    for suffix in (".png", ".svg"):
        path = out_base.with_suffix(suffix)
        metadata = {"Date": None} if suffix == ".svg" else {"Software": None}
        fig.savefig(path, dpi=130, bbox_inches="tight", metadata=metadata)
        written.append(path)
    return written


def _format_ms(value: float) -> str:
    if value >= 100:
        return f"{value:.0f} ms"
    if value >= 1:
        return f"{value:.2f} ms"
    return f"{value * 1000:.0f} us" if value < 0.1 else f"{value:.3f} ms"


def figure_time(rows: list[dict], out_base: Path, plt) -> list[Path]:
    """Bars of the median (p10-p90 whiskers) per implementation at the benchmark batch."""
    batch = _benchmark_batch(rows)
    at_batch = [r for r in rows if r["batch"] == batch]
    modes = _present(at_batch, "mode", (FORWARD, TRAINING))
    precisions = _present(at_batch, "precision", tuple(PRECISION_TITLES))
    names = implementation_order(rows)
    colors = colors_for(names)
    fig, axes = plt.subplots(len(modes), len(precisions), squeeze=False,
                             figsize=(5.2 * len(precisions), 0.45 * len(names) * len(modes) + 2.2))
    for i, mode in enumerate(modes):
        for j, precision in enumerate(precisions):
            ax = axes[i][j]
            cell = {r["implementation"]: r for r in at_batch
                    if r["mode"] == mode and r["precision"] == precision}
            ok = [cell[n]["median_ms"] for n in names if n in cell and cell[n]["status"] == "ok"]
            low = min(ok) / 3 if ok else 0.01
            high = max(ok) * 30 if ok else 1.0
            for y, name in enumerate(names):
                row = cell.get(name)
                if row is None:
                    continue
                if row["status"] != "ok":
                    ax.text(low * 1.1, y, f"{name}: {row['status']}", va="center", fontsize=8,
                            color="#a00000" if row["status"] in ("failed-check", "error", "oom")
                            else "#777777")
                    continue
                median = row["median_ms"]
                spread = [[median - (row["p10_ms"] or median)],
                          [(row["p90_ms"] or median) - median]]
                ax.barh(y, median, color=colors[name], xerr=spread, capsize=2,
                        error_kw={"elinewidth": 0.8})
                label = _format_ms(median)
                parts = []
                if row["speedup_vs_eager"] is not None and name != "eager":
                    parts.append(f"{row['speedup_vs_eager']:.1f}x eager")
                if row["speedup_vs_compile"] is not None and name != "compile":
                    parts.append(f"{row['speedup_vs_compile']:.1f}x compile")
                if parts:
                    label += "  (" + ", ".join(parts) + ")"
                ax.text((row["p90_ms"] or median) * 1.15, y, label, va="center", fontsize=8)
            ax.set_xscale("log")
            ax.set_xlim(low, high)
            ax.set_yticks(range(len(names)), names, fontsize=8)
            ax.set_ylim(len(names) - 0.5, -0.5)
            ax.set_title(f"{MODE_TITLES[mode]}\n{PRECISION_TITLES.get(precision, precision)}",
                         fontsize=9)
            ax.set_xlabel("median time per call, ms (log; whiskers p10-p90)", fontsize=8)
            ax.grid(axis="x", which="both", alpha=0.25)
    fig.suptitle(_title(f"time per implementation, batch {batch}", rows), fontsize=10)
    fig.tight_layout()
    _footnote(fig, rows)
    written = _save(fig, out_base)
    plt.close(fig)
    return written


def figure_scaling(rows: list[dict], out_base: Path, plt) -> list[Path]:
    """Median time against batch, log-log, with the forward floor where DESIGN gives one."""
    modes = _present(rows, "mode", (FORWARD, TRAINING))
    precisions = _present(rows, "precision", tuple(PRECISION_TITLES))
    names = implementation_order(rows)
    colors = colors_for(names)
    fig, axes = plt.subplots(len(modes), len(precisions), squeeze=False,
                             figsize=(4.6 * len(precisions), 3.8 * len(modes) + 0.8))
    for i, mode in enumerate(modes):
        for j, precision in enumerate(precisions):
            ax = axes[i][j]
            cell = [r for r in rows if r["mode"] == mode and r["precision"] == precision]
            for name in names:
                points = sorted((r["batch"], r["median_ms"], r["p10_ms"], r["p90_ms"])
                                for r in cell if r["implementation"] == name
                                and r["status"] == "ok")
                if not points:
                    continue
                batches = [p[0] for p in points]
                ax.plot(batches, [p[1] for p in points], marker="o", ms=4, label=name,
                        color=colors[name],
                        linestyle=BASELINE_STYLES.get(name, "-"))
                ax.fill_between(batches, [p[2] for p in points], [p[3] for p in points],
                                color=colors[name], alpha=0.15, linewidth=0)
            floors = sorted({(r["batch"], r["floor_ms"]) for r in cell
                             if r["floor_ms"] is not None})
            if floors:
                ax.plot([f[0] for f in floors], [f[1] for f in floors], color="black",
                        linestyle=":", label="forward floor (DESIGN 7)")
            _batch_axis(ax, cell)
            _y_axis(ax)
            ax.set_ylabel("median ms (band p10-p90)", fontsize=8)
            ax.set_title(f"{MODE_TITLES[mode]}\n{PRECISION_TITLES.get(precision, precision)}",
                         fontsize=9)
            ax.grid(which="both", alpha=0.25)
            _legend(ax)
    fig.suptitle(_title("scaling with batch", rows), fontsize=10)
    fig.tight_layout()
    _footnote(fig, rows)
    written = _save(fig, out_base)
    plt.close(fig)
    return written


def figure_memory(rows: list[dict], out_base: Path, plt) -> list[Path] | None:
    """Extra peak memory of forward+backward: bars at the benchmark batch, lines over batch."""
    training = [r for r in rows if r["mode"] == TRAINING and r["status"] == "ok"
                and r["peak_extra_mib"] is not None]
    if not training:
        return None
    batch = _benchmark_batch(training)
    precisions = _present(training, "precision", tuple(PRECISION_TITLES))
    names = implementation_order(rows)
    colors = colors_for(names)
    fig, axes = plt.subplots(2, len(precisions), squeeze=False,
                             figsize=(4.8 * len(precisions), 0.4 * len(names) + 6.5))
    full_size = all(r.get("spatial") == "16x32x32" for r in training)
    for j, precision in enumerate(precisions):
        cell = [r for r in training if r["precision"] == precision]
        ax = axes[0][j]
        at_batch = {r["implementation"]: r for r in cell if r["batch"] == batch}
        values = [max(at_batch[n]["peak_extra_mib"], 0.01) if n in at_batch else math.nan
                  for n in names]
        ax.barh(range(len(names)), values, color=[colors[n] for n in names])
        for y, value in enumerate(values):
            if not math.isnan(value):
                ax.text(value * 1.15, y, f"{value:.0f} MiB" if value >= 10 else
                        f"{value:.2f} MiB", va="center", fontsize=8)
        if full_size and batch == BENCHMARK_BATCH:
            ax.axvline(MEMORY_TARGET_MIB, color="black", linestyle=":", label="target 80 MiB")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_xscale("log")
        finite = [v for v in values if not math.isnan(v)]
        ax.set_xlim(min(finite) / 3, max(finite) * 20)
        # Say why a bar is missing: not timed here, or timed without a memory number.
        for y, name in enumerate(names):
            if not math.isnan(values[y]):
                continue
            row = next((r for r in rows if r["implementation"] == name
                        and r["mode"] == TRAINING and r["precision"] == precision
                        and r["batch"] == batch), None)
            if row is None:
                continue
            why = ("not measured (CUDA graphs)" if row["status"] == "ok" else row["status"])
            ax.text(min(finite) / 2.7, y, why, va="center", fontsize=8, color="#777777")
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_ylim(len(names) - 0.5, -0.5)
        ax.set_xlabel("extra peak MiB over inputs and weights (log)", fontsize=8)
        ax.set_title(f"batch {batch}, {PRECISION_TITLES.get(precision, precision)}", fontsize=9)
        ax.grid(axis="x", which="both", alpha=0.25)
        ax = axes[1][j]
        for name in names:
            points = sorted((r["batch"], max(r["peak_extra_mib"], 0.01)) for r in cell
                            if r["implementation"] == name)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=4,
                        label=name, color=colors[name],
                        linestyle=BASELINE_STYLES.get(name, "-"))
        _batch_axis(ax, cell)
        _y_axis(ax)
        ax.set_ylabel("extra peak MiB", fontsize=8)
        ax.grid(which="both", alpha=0.25)
        _legend(ax)
    fig.suptitle(_title("extra peak memory of a training step (forward + backward)", rows),
                 fontsize=10)
    fig.tight_layout()
    _footnote(fig, rows)
    written = _save(fig, out_base)
    plt.close(fig)
    return written


def figure_roofline(rows: list[dict], out_base: Path, plt) -> list[Path] | None:
    """Floor / measured time of the forward, in percent, per precision with a floor."""
    forward = [r for r in rows if r["mode"] == FORWARD and r["status"] == "ok"
               and r["floor_ms"] is not None and r["median_ms"]]
    if not forward:
        return None
    precisions = _present(forward, "precision", ("tf32", "fp32"))
    names = implementation_order(rows)
    colors = colors_for(names)
    fig, axes = plt.subplots(1, len(precisions), squeeze=False,
                             figsize=(5.2 * len(precisions), 4.4))
    for j, precision in enumerate(precisions):
        ax = axes[0][j]
        cell = [r for r in forward if r["precision"] == precision]
        for name in names:
            points = sorted((r["batch"], 100.0 * r["floor_ms"] / r["median_ms"]) for r in cell
                            if r["implementation"] == name)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=4,
                        label=name, color=colors[name],
                        linestyle=BASELINE_STYLES.get(name, "-"))
        floor16 = next((r["floor_ms"] for r in cell if r["batch"] == BENCHMARK_BATCH), None)
        ax.axhline(100, color="black", linestyle=":")
        _batch_axis(ax, cell)
        _y_axis(ax, always_log=True)
        ax.set_ylim(top=150)
        ax.set_ylabel("floor / measured time, % (100% = at the floor)", fontsize=8)
        floor_text = f"floor {floor16 * 1000:.0f} us at batch 16" if floor16 else ""
        ax.set_title(f"forward, {PRECISION_TITLES.get(precision, precision)}\n{floor_text}",
                     fontsize=9)
        ax.grid(which="both", alpha=0.25)
        _legend(ax)
    gpu = rows[0].get("gpu", "")
    note = "" if "H100" in gpu else " (floors measured on the lent H100, not this GPU)"
    fig.suptitle(_title("share of the forward floor (DESIGN section 7; floors scale with batch)"
                        + note, rows), fontsize=10)
    fig.tight_layout()
    _footnote(fig, rows)
    written = _save(fig, out_base)
    plt.close(fig)
    return written


def markdown_table(rows: list[dict]) -> str:
    """Median ms, speedups and memory at the benchmark batch, one line per implementation."""
    batch = _benchmark_batch(rows)
    at_batch = [r for r in rows if r["batch"] == batch]
    modes = _present(at_batch, "mode", (FORWARD, TRAINING), ok_only=False)
    precisions = _present(at_batch, "precision", tuple(PRECISION_TITLES), ok_only=False)
    columns = [(m, p) for m in modes for p in precisions]
    cell = {(r["implementation"], r["mode"], r["precision"]): r for r in at_batch}
    header = ["implementation"] + [
        f"{'fwd' if m == FORWARD else 'fwd+bwd'} {p} ms (vs eager / vs compile)"
        for m, p in columns] + [f"fwd+bwd {p} peak MiB" for p in precisions]
    first = rows[0]
    flushed = " (L2 flushed before each)" if first.get("device") == "cuda" else ""
    dates = sorted({r.get("date", "")[:10] for r in at_batch})
    commits = sorted({r.get("git_commit", "") for r in at_batch if r.get("git_commit")})
    lines = [f"Batch {batch}, {first.get('gpu') if first.get('device') == 'cuda' else 'CPU'}, "
             f"{', '.join(dates)}, commit {', '.join(commits)}: median of "
             f"the timed runs{flushed}, speedups from the same run.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in implementation_order(at_batch):
        cells = [name]
        for mode, precision in columns:
            row = cell.get((name, mode, precision))
            if row is None:
                cells.append("")
            elif row["status"] != "ok":
                cells.append(row["status"])
            else:
                ratios = "/".join(f"{row[k]:.2f}x" if row[k] is not None else "-"
                                  for k in ("speedup_vs_eager", "speedup_vs_compile"))
                cells.append(f"{row['median_ms']:.4g} ({ratios})")
        for precision in precisions:  # memory differs per precision (dtype and backward path)
            row = cell.get((name, TRAINING, precision))
            ok = row is not None and row["status"] == "ok" and row["peak_extra_mib"] is not None
            cells.append(f"{row['peak_extra_mib']:.0f}" if ok else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def draw(path: Path) -> list[Path]:
    """Every figure for one data file; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "fused3d"
    plt.rcParams["axes.axisbelow"] = True
    rows = load_rows(path)
    written: list[Path] = []
    groups = split_by_device(rows)
    for (device, gpu), group in groups.items():
        stem = path.stem
        if len(groups) > 1:  # never mix devices in one figure
            tag = "".join(c if c.isalnum() else "_" for c in (gpu or device))[:40]
            stem = f"{stem}_{tag}"
        base = path.with_name(stem)
        if not any(r["status"] == "ok" for r in group):
            print(f"{path}: no successful rows for {gpu or device}; nothing to draw",
                  file=sys.stderr)
            continue
        written += figure_time(group, base.with_name(f"{stem}_time"), plt)
        written += figure_scaling(group, base.with_name(f"{stem}_scaling"), plt)
        written += figure_memory(group, base.with_name(f"{stem}_memory"), plt) or []
        written += figure_roofline(group, base.with_name(f"{stem}_roofline"), plt) or []
        table = base.with_name(f"{stem}_table.md")
        table.write_text(markdown_table(group))
        written.append(table)
    return written


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused3d.bench.plots",
                                     description="Draw the fused3d benchmark figures.")
    parser.add_argument("--data", type=Path, action="append", default=None,
                        help="CSV written by python -m fused3d.bench (repeatable; default: "
                             "every plots/bench_*.csv)")
    parser.add_argument("--out", type=Path, default=Path("plots"),
                        help="where to look for data when --data is not given")
    args = parser.parse_args(None if argv is None else list(argv))
    paths = args.data or sorted(args.out.glob("bench_*.csv"))
    if not paths:
        print(f"no data: run `python -m fused3d.bench` first (looked in {args.out}/)",
              file=sys.stderr)
        return 1
    for path in paths:
        if not path.exists():
            print(f"{path}: no such file", file=sys.stderr)
            return 1
        for written in draw(path):
            print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
