"""The search's own pictures, PNGs for the search run's artifacts (matplotlib, Agg backend):

- `pareto.png`: every trial's validation metric against its trainable parameters, the Pareto
  front (better metric for fewer parameters) marked;
- `load_map.png`: per-layer expert load (layers x experts, share of the training tokens' routing
  assignments) of the best trials, the best of each method side by side when several ran; beside
  each layer's row, its per-batch routing at the last evaluation ("batch H 0.33, 2.0 used"),
  collapsed layers in red (`health_labels`): a whole-run load map hides a router that gives
  every token of a batch one pair of experts and rotates the pair between batches;
- `stability.png`: each re-run configuration's seeds as points, with their mean and std.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipelines.errors import first_line
from pipelines.records import health_rows
from pipelines.stages import rank_trials

PARETO, LOAD_MAP, STABILITY = "pareto.png", "load_map.png", "stability.png"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: list[tuple[float, float]], mode: str = "max") -> list[int]:
    """Indices of the points (cost, value) no other point beats: at most the cost and at least
    as good a value (`mode` max) with one of the two strictly better; sorted by cost."""
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    front = []
    for i, (cost, value) in enumerate(points):
        dominated = any(
            c <= cost and (better(v, value) or v == value) and (c < cost or better(v, value))
            for j, (c, v) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_pareto(rows: list[dict[str, Any]], metric: str, mode: str, path: Path) -> Path:
    """`metric` against `trainable_params` for every trial with both, the front marked.

    Raises:
        ValueError: No trial has both figures.
    """
    pts = [
        r
        for r in rows
        if isinstance(r.get(metric), int | float)
        and isinstance(r.get("trainable_params"), int | float)
    ]
    if not pts:
        raise ValueError(f"no trial reported both {metric} and trainable_params")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    xy = [(float(r["trainable_params"]), float(r[metric])) for r in pts]
    colours = {"completed": "tab:blue", "stopped_early_asha": "tab:orange"}
    for status in sorted({r["status"] for r in pts}):
        sel = [i for i, r in enumerate(pts) if r["status"] == status]
        ax.scatter(
            [xy[i][0] for i in sel],
            [xy[i][1] for i in sel],
            s=40,
            alpha=0.8,
            color=colours.get(status, "tab:gray"),
            label=status.replace("_", " "),
        )
    front = pareto_front(xy, mode)
    ax.plot(
        [xy[i][0] for i in front],
        [xy[i][1] for i in front],
        "-o",
        color="tab:red",
        mfc="none",
        ms=12,
        label="Pareto front",
    )
    for r, (x, y) in zip(pts, xy, strict=True):
        ax.annotate(
            f"{r['trial']:02d}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8
        )
    if max(x for x, _ in xy) > 10 * min(x for x, _ in xy):
        ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"{metric} (last evaluation)")
    ax.set_title(f"{metric} against trainable parameters: {len(pts)} trials")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def health_labels(health: Mapping[str, float], layers: int) -> list[tuple[str, bool]]:
    """Per MoE layer, the label beside its load-map row and whether its routing collapsed.

    Args:
        health: a trial's `layer{i}/batch_entropy`, `layer{i}/experts_used`... at its last
            evaluation (`pipelines.records.routing_health`, its `routing_health.json`).
        layers: rows of its load map.

    Returns:
        ("batch H 0.33, 2.0 used", collapsed) per layer, collapsed as
        `graphlora.health.collapsed_layers` says (batch entropy below `COLLAPSE_ENTROPY`), its
        label ending "collapsed"; ("", False) for a layer without figures.
    """
    from graphlora.health import collapsed_layers

    rows, collapsed = health_rows(health), set(collapsed_layers(health))
    out = []
    for i in range(layers):
        row = rows[i] if i < len(rows) else {}
        parts = []
        if "batch_entropy" in row:
            parts.append(f"batch H {row['batch_entropy']:.2f}")
        if "experts_used" in row:
            parts.append(f"{row['experts_used']:.1f} used")
        if i in collapsed:
            parts.append("collapsed")
        out.append((", ".join(parts), i in collapsed))
    return out


def plot_load_maps(
    maps: dict[str, list[list[float]]],
    path: Path,
    health: Mapping[str, Mapping[str, float]] | None = None,
) -> Path:
    """One heatmap per labelled load map (layers x experts), each row as shares of its layer;
    beside each row, that layer's `health_labels` when `health` (label -> figures) has them.

    Raises:
        ValueError: No load map.
    """
    if not maps:
        raise ValueError("no trial recorded its routing counts (routing_counts.json)")
    health = health or {}
    labelled = any(health.get(label) for label in maps)
    plt = _pyplot()
    width = 6.5 if labelled else 4.5
    fig, axes = plt.subplots(
        1, len(maps), figsize=(width * len(maps) + 1, 5), squeeze=False, constrained_layout=True
    )
    image = None
    for ax, (label, counts) in zip(axes[0], maps.items(), strict=True):
        shares = [[c / (sum(row) or 1.0) for c in row] for row in counts]
        image = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_xticks(range(len(shares[0])))
        ax.set_yticks(range(len(shares)))
        for i, (text, collapsed) in enumerate(health_labels(health.get(label, {}), len(shares))):
            ax.annotate(  # just right of the row, outside the heatmap
                text,
                (1.0, i),
                xycoords=("axes fraction", "data"),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
                color="tab:red" if collapsed else "black",
                fontweight="bold" if collapsed else "normal",
            )
    fig.colorbar(image, ax=axes[0].tolist(), label="share of the layer's routing (training tokens)")
    title = "expert load per layer, whole run"
    if labelled:
        from graphlora.health import COLLAPSE_ENTROPY

        title += (
            "; right: per-batch routing entropy H (0-1) and experts in use, last evaluation "
            f"(red: collapsed, H < {COLLAPSE_ENTROPY:g})"
        )
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_stability(groups: list[dict[str, Any]], metric: str, path: Path) -> Path:
    """Per re-run configuration, its seeds' `metric` (and test accuracy when measured) as
    points, mean and std as a bar.

    Raises:
        ValueError: No configuration has seed values.
    """
    panels = [("objective", metric)]
    if any(g.get("values", {}).get("test_accuracy") for g in groups):
        panels.append(("test_accuracy", "test_accuracy"))
    if not any(g.get("values", {}).get("objective") for g in groups):
        raise ValueError("no stability configuration has seed results")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 1, 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        for x, g in enumerate(groups):
            vals = g.get("values", {}).get(key) or []
            if not vals:
                continue
            ax.scatter([x] * len(vals), vals, color="tab:blue", alpha=0.6, s=30, zorder=3)
            mean = statistics.fmean(vals)
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            ax.errorbar(x + 0.15, mean, yerr=std, fmt="D", color="tab:red", capsize=5, zorder=4)
            ax.annotate(
                f"{mean:.3f} ± {std:.3f}",
                (x + 0.15, mean),
                textcoords="offset points",
                xytext=(8, 0),
                fontsize=8,
            )
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(
            [f"{g['group']}\n(trial {g['from_trial']:02d})" for g in groups], fontsize=8
        )
        ax.set_xlim(-0.5, len(groups) - 0.2)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("stability: seeds (points), mean ± sample std (diamond)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def best_load_map_trials(rows: list[dict[str, Any]], mode: str, methods: dict[str, str]) -> list:
    """Trial rows whose load maps to draw: the best of each method when several methods ran
    (`methods`: trial id -> method), else the best two; best by `objective`."""
    done = rank_trials(rows, mode)
    seen: dict[str, dict] = {}
    for r in done:
        seen.setdefault(methods.get(r["trial_id"], ""), r)
    return list(seen.values()) if len(seen) > 1 else done[:2]


def save_search_pictures(
    out_dir: Path,
    rows: list[dict[str, Any]],
    stability: list[dict[str, Any]],
    load_maps: dict[str, list[list[float]]],
    *,
    metric: str,
    mode: str,
    health: Mapping[str, Mapping[str, float]] | None = None,
) -> tuple[list[Path], list[str]]:
    """The three pictures into `out_dir` (`health`: per load map's label, its trial's routing
    figures, `plot_load_maps`); returns the files written and, for each picture that could not
    be drawn, a one-line reason (a picture is a nicety: the search goes on)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for name, draw in (
        (PARETO, lambda p: plot_pareto(rows, metric, mode, p)),
        (LOAD_MAP, lambda p: plot_load_maps(load_maps, p, health)),
        (STABILITY, lambda p: plot_stability(stability, metric, p)),
    ):
        if name == STABILITY and not stability:
            continue
        try:
            written.append(draw(out_dir / name))
        except Exception as exc:
            skipped.append(f"{name}: {first_line(exc)}")
    return written, skipped
