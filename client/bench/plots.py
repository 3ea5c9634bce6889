"""PNG plots of result files (from `run` or `goodput`), one line per system:

- attainment_vs_rate.png: SLO attainment at each measured rate, the target as a dashed line;
- attainment_vs_slo_scale.png: attainment as both SLOs are scaled, at one rate per system
  (a `run` file's rate, or a `goodput` file's sweep rate);
- latency_cdf.png: TTFT and TPOT CDFs at that same rate, the SLOs as dotted lines.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .goodput import DEFAULT_SCALES
from .metrics import SLO, RequestResult, slo_scale_sweep


def doc_label(doc: dict[str, Any], fallback: str) -> str:
    return str(doc.get("label") or fallback)


def doc_slo(doc: dict[str, Any]) -> SLO | None:
    slo = doc.get("slo")
    return SLO(slo["ttft_s"], slo["tpot_s"]) if slo else None


def rate_points(doc: dict[str, Any]) -> list[tuple[float, float]]:
    """(rate, attainment) pairs, sorted by rate."""
    if doc.get("kind") == "goodput":
        return sorted((p["rate"], p["attainment"]) for p in doc["points"])
    att = (doc.get("summary") or {}).get("attainment")
    return [] if att is None else [(doc["rate"], att)]


def fixed_rate_results(doc: dict[str, Any]) -> tuple[float | None, list[RequestResult]]:
    """The rate and results the sweep and CDFs use."""
    if doc.get("kind") == "goodput":
        rate = (doc.get("sweep") or {}).get("rate")
        points = [p for p in doc["points"] if p["rate"] == rate]
        if not points:
            return None, []
        return rate, [RequestResult.from_json(r) for r in points[0]["results"]]
    return doc.get("rate"), [RequestResult.from_json(r) for r in doc.get("results", [])]


def plot_docs(docs: Sequence[dict[str, Any]], labels: Sequence[str], out_dir: Path,
              prefix: str = "") -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (("attainment_vs_rate", _draw_rate), ("attainment_vs_slo_scale", _draw_scale),
                       ("latency_cdf", _draw_cdf)):
        fig = draw(plt, docs, labels)
        if fig is None:
            continue
        path = out_dir / f"{prefix}{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _title(docs: Sequence[dict[str, Any]]) -> str:
    workloads = sorted({(d.get("workload") or {}).get("name", "?") for d in docs})
    slo = doc_slo(docs[0])
    slo_text = f"SLO TTFT {slo.ttft_s:.3g} s, TPOT {slo.tpot_s:.3g} s" if slo else "no SLO"
    return f"{'/'.join(workloads)} - {slo_text}"


def _draw_rate(plt: Any, docs: Sequence[dict[str, Any]], labels: Sequence[str]) -> Any:
    series = [(label, rate_points(d)) for d, label in zip(docs, labels)]
    if not any(points for _, points in series):
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for (label, points), doc in zip(series, docs):
        if points:
            xs, ys = zip(*points)
            good = doc.get("goodput_rps")
            extra = f" (goodput {good:.3g} rps)" if good is not None else ""
            ax.plot(xs, [100 * y for y in ys], marker="o", label=label + extra)
    target = next((d.get("target") for d in docs if d.get("target")), 0.9)
    ax.axhline(100 * target, color="gray", linestyle="--", linewidth=1)
    ax.set(xlabel="rate (requests/s)", ylabel="SLO attainment (%)", ylim=(-3, 103),
           title=_title(docs))
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _draw_scale(plt: Any, docs: Sequence[dict[str, Any]], labels: Sequence[str]) -> Any:
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    drawn = False
    for doc, label in zip(docs, labels):
        slo = doc_slo(doc)
        rate, results = fixed_rate_results(doc)
        if slo is None or not results:
            continue
        scales = (doc.get("sweep") or {}).get("scales") or list(DEFAULT_SCALES)
        ys = slo_scale_sweep(results, slo, scales)
        ax.plot(scales, [100 * y for y in ys], marker="o", label=f"{label} @ {rate:.3g} rps")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    target = next((d.get("target") for d in docs if d.get("target")), 0.9)
    ax.axhline(100 * target, color="gray", linestyle="--", linewidth=1)
    ax.set(xlabel="SLO scale (both SLOs multiplied)", ylabel="SLO attainment (%)",
           ylim=(-3, 103), title=_title(docs))
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _draw_cdf(plt: Any, docs: Sequence[dict[str, Any]], labels: Sequence[str]) -> Any:
    import numpy as np
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    drawn = False
    for doc, label in zip(docs, labels):
        rate, results = fixed_rate_results(doc)
        ok = [r for r in results if r.ok]
        if not ok:
            continue
        for ax, key in zip(axes, ("ttft_s", "tpot_s")):
            values = np.sort([getattr(r, key) for r in ok if getattr(r, key) is not None])
            if values.size:
                # failures count as never served: the curve tops out at the share that succeeded
                ys = np.arange(1, values.size + 1) / len(results)
                ax.step(1e3 * values, 100 * ys, where="post", label=f"{label} @ {rate:.3g} rps")
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    from matplotlib import ticker
    slo = doc_slo(docs[0])
    for ax, key, name in zip(axes, ("ttft_s", "tpot_s"), ("TTFT", "TPOT")):
        if slo is not None:
            ax.axvline(1e3 * getattr(slo, key), color="gray", linestyle=":", linewidth=1)
        ax.set(xlabel=f"{name} (ms, log scale)", ylabel="requests (%)", ylim=(0, 101), xscale="log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(_title(docs), fontsize=9)
    return fig
