"""Run outputs: results.json (every number with its config), report.md, and PNG plots."""
from __future__ import annotations

import json
import textwrap
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

log = logging.getLogger(__name__)


def jsonable(value: Any) -> Any:
    """JSON form of tensors / arrays (lists), objects with to_json(), and anything else (its str)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "to_json"):
        return value.to_json()
    return str(value)


def write_json(path: Path, data: dict) -> Path:
    """Write `data` as indented JSON (tensors as lists, objects with to_json as their JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=jsonable))
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; floats with two decimals."""
    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def heatmap(path: Path, matrix: np.ndarray, title: str, xlabel: str = "head", ylabel: str = "layer",
            vmin: float = 0.0, vmax: float = 1.0, cmap: str = "viridis",
            xticklabels: Sequence[str] | None = None) -> Path:
    """A layer x head grid (row 0 at the bottom, like a model's depth); `xticklabels` names the columns."""
    matrix = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 + 0.45 * matrix.shape[1]), max(2.8, 1.2 + 0.4 * matrix.shape[0])))
    im = ax.imshow(matrix, origin="lower", vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    ax.set_xticks(range(matrix.shape[1]))
    if xticklabels is not None:
        ax.set_xticklabels(xticklabels, fontsize=7)
    ax.set_yticks(range(matrix.shape[0]))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, 48), fontsize=8)
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < (vmin + vmax) / 2 else "k")
    fig.colorbar(im, ax=ax, fraction=0.05)
    return _save(fig, path)


def _bars(ax, groups: Sequence[str], series: dict[str, Sequence[float]], errors: dict | None, title: str,
          ylabel: str) -> None:
    width = 0.8 / max(len(series), 1)
    for k, (name, values) in enumerate(series.items()):
        err = None if errors is None else errors.get(name)
        ax.bar(np.arange(len(groups)) + k * width, values, width, label=name, yerr=err, capsize=2 if err else 0)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2)
    ax.set_xticklabels([textwrap.fill(g, 14) for g in groups], fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, 60), fontsize=9)
    ax.legend(fontsize=7)


def grouped_bars(path: Path, groups: Sequence[str], series: dict[str, Sequence[float]], title: str,
                 ylabel: str = "accuracy", errors: dict[str, Sequence[float]] | None = None) -> Path:
    """Bars per group (e.g. desideratum), one colour per series (e.g. mask trained on X); `errors` (same keys as
    `series`) draws error bars (e.g. the std over resamples)."""
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(groups), 3.2))
    _bars(ax, groups, series, errors, title, ylabel)
    return _save(fig, path)


def bar_panels(path: Path, panels: dict[str, tuple[Sequence[str], dict, dict | None]], title: str,
               ylabel: str = "accuracy") -> Path:
    """Several grouped-bar panels side by side: {panel title: (groups, series, errors or None)}."""
    fig, axes = plt.subplots(1, len(panels), figsize=(0.5 + 4.0 * len(panels), 3.8), squeeze=False,
                             constrained_layout=True)
    for ax, (name, (groups, series, errors)) in zip(axes[0], panels.items()):
        _bars(ax, groups, series, errors, name, ylabel)
    fig.suptitle(textwrap.fill(title, 110), fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def heatmap_panels(path: Path, panels: dict[str, np.ndarray], title: str, xlabel: str = "head",
                   ylabel: str = "layer", vmin: float = 0.0, vmax: float = 1.0, cmap: str = "viridis") -> Path:
    """Several layer x head grids side by side with one colour scale (e.g. one per circuit group)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(0.8 + 2.8 * len(panels), 3.6), squeeze=False,
                             constrained_layout=True)
    im = None
    for ax, (name, matrix) in zip(axes[0], panels.items()):
        matrix = np.asarray(matrix, dtype=float)
        im = ax.imshow(matrix, origin="lower", vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
        ax.set_xticks(range(matrix.shape[1]))
        ax.set_yticks(range(matrix.shape[0]))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(textwrap.fill(name, 28), fontsize=8)
        if matrix.size <= 400:
            for (i, j), v in np.ndenumerate(matrix):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5,
                        color="w" if v < (vmin + vmax) / 2 else "k")
    fig.suptitle(textwrap.fill(title, 110), fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), fraction=0.03)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def line_plot(path: Path, x: Sequence[float], ys: dict[str, Sequence[float]], title: str, xlabel: str,
              ylabel: str, logx: bool = False) -> Path:
    """One line per series against `x` (optionally a symmetric-log x axis)."""
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for name, y in ys.items():
        ax.plot(x, y, marker="o", label=name)
    if logx:
        ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)
