"""Evaluation reports: Markdown + JSON + PNG plots, rendered to a standalone HTML page.

A report is sections of text, tables and figures, plus the settings of every metric (classes, threshold,
subset, model files, N), which are written into both files so a number never travels without its
definition. Figures are checked before saving: every data plot needs axis labels, and a legend when it
draws more than one series, so unreadable plots fail loudly instead of landing in a report.
"""
from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # reports are written headless (CI, servers)
import matplotlib.pyplot as plt  # noqa: E402


class FigureCheckError(ValueError):
    """A figure lacks axis labels or a legend."""


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list]
    note: str = ""


@dataclass
class Figure:
    """A matplotlib figure (saved as `name`.png) or an existing PNG path."""
    name: str
    caption: str
    fig: object = None
    path: str | None = None


@dataclass
class Section:
    heading: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
def check_figure(fig) -> None:
    """Every axes that draws data must have x and y labels; with ≥ 2 labelled series, a legend.
    Image grids (imshow-only panels) need at least one panel title / row label."""
    image_axes, labelled_images = 0, 0
    for ax in fig.get_axes():
        if not ax.get_visible():
            continue
        is_image = bool(ax.get_images()) and not ax.lines and not ax.patches and not ax.collections
        if is_image:
            image_axes += 1
            labelled_images += bool(ax.get_title() or ax.get_xlabel() or ax.get_ylabel())
            continue
        if not (ax.lines or ax.patches or ax.collections):
            continue  # an empty helper axes (e.g. hidden spare subplot)
        if not ax.get_xlabel() or not ax.get_ylabel():
            raise FigureCheckError(f"axes {ax.get_title()!r} lacks an x or y label")
        handles, labels = ax.get_legend_handles_labels()
        if len([lbl for lbl in labels if not lbl.startswith("_")]) >= 2 and ax.get_legend() is None:
            raise FigureCheckError(f"axes {ax.get_title()!r} draws several series without a legend")
    if image_axes and not labelled_images:
        raise FigureCheckError("image grid without any panel title or row/column label")


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    check_figure(fig)
    path = Path(path)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_strength_sweep(strengths: Sequence[float], removal: dict[str, Sequence[float]],
                        retained: dict[str, Sequence[float]], removal_label: str = "concept removal",
                        retained_label: str = "retained quality", xlabel: str = "strength", title: str = ""):
    """Two panels sharing the strength axis: removal metrics (left) and retained-quality metrics (right)."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharex=True)
    for ax, series, ylabel in ((axes[0], removal, removal_label), (axes[1], retained, retained_label)):
        for name, ys in series.items():
            ax.plot(list(strengths), list(ys), marker="o", label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_concept_bars(concepts: Sequence[str], scores: dict[str, Sequence[float]], ylabel: str = "score (%)",
                      xlabel: str = "unlearned concept", title: str = ""):
    """Grouped bars: one group per concept, one bar per metric (e.g. UA / IRA / CRA)."""
    n, k = len(concepts), max(len(scores), 1)
    width = 0.8 / k
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * n * k / 2 + 2), 3.6))
    for j, (name, vals) in enumerate(scores.items()):
        ax.bar([i + (j - (k - 1) / 2) * width for i in range(n)], list(vals), width, label=name)
    ax.set_xticks(range(n))
    ax.set_xticklabels(list(concepts), rotation=30 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    # legend above the axes so it never hides bars near 100 %
    ax.legend(fontsize=8, ncol=k, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_image_grid(images: Sequence, rows: int, cols: int, row_labels: Sequence[str] | None = None,
                    col_labels: Sequence[str] | None = None, title: str = "", cell: float = 1.3):
    """A grid of PIL images / HxWx3 arrays; row labels on the left, column labels on top."""
    import numpy as np

    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell + 1, rows * cell + 0.6), squeeze=False)
    for idx, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if idx < len(images):
            ax.imshow(np.asarray(images[idx]))
        else:
            ax.set_visible(False)
        r, c = divmod(idx, cols)
        if c == 0 and row_labels:
            ax.set_ylabel(row_labels[r], fontsize=8)
        if r == 0 and col_labels:
            ax.set_title(col_labels[c], fontsize=8)
        if ax.get_visible() and not (row_labels or col_labels):
            ax.set_title(f"#{idx}", fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def _cell(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    lines = [f"**{t.title}**", "", "| " + " | ".join(_cell(c) for c in t.columns) + " |",
             "|" + "|".join("---" for _ in t.columns) + "|"]
    for r in t.rows:
        if len(r) != len(t.columns):
            raise ValueError(f"table {t.title!r}: row {r} has {len(r)} cells for {len(t.columns)} columns")
        lines.append("| " + " | ".join(_cell(c) for c in r) + " |")
    if t.note:
        lines += ["", f"_{t.note}_"]
    return "\n".join(lines)


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if hasattr(v, "item"):
        return v.item()
    return str(v)


def write_report(out_dir: str | Path, title: str, sections: Sequence[Section], settings: dict,
                 html_too: bool = True) -> dict[str, Path]:
    """Write report.md, report.json, the figures' PNGs (and report.html). Returns the paths."""
    import shutil

    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", ""]
    js: dict = {"title": title, "settings": _jsonable(settings), "sections": []}
    for sec in sections:
        md += [f"## {sec.heading}", ""]
        if sec.text:
            md += [sec.text, ""]
        jsec = {"heading": sec.heading, "text": sec.text, "tables": [], "figures": []}
        for t in sec.tables:
            md += [_md_table(t), ""]
            jsec["tables"].append({"title": t.title, "note": t.note,
                                   "rows": [dict(zip(t.columns, map(_jsonable, r))) for r in t.rows]})
        for f in sec.figures:
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f.name)
            dest = out / "figures" / f"{name}.png"
            if f.fig is not None:
                save_figure(f.fig, dest)
            elif f.path is not None:
                if Path(f.path).resolve() != dest.resolve():
                    shutil.copyfile(f.path, dest)
            else:
                raise ValueError(f"figure {f.name!r} has neither a figure nor a path")
            rel = dest.relative_to(out).as_posix()
            md += [f"![{f.caption}]({rel})", "", f"_{f.caption}_", ""]
            jsec["figures"].append({"name": name, "caption": f.caption, "path": rel})
        js["sections"].append(jsec)
    md += ["## Settings", "", "Exact settings of every metric in this report:", "", "```json",
           json.dumps(js["settings"], indent=2, ensure_ascii=False), "```", ""]
    paths = {"md": out / "report.md", "json": out / "report.json"}
    paths["md"].write_text("\n".join(md), encoding="utf-8")
    paths["json"].write_text(json.dumps(js, indent=2, ensure_ascii=False), encoding="utf-8")
    if html_too:
        paths["html"] = render_html(paths["md"])
    return paths


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
        "th{background:#eee}img{max-width:100%}pre{background:#f6f6f6;padding:.7em;overflow:auto}")


def render_html(md_path: str | Path) -> Path:
    """report.md -> report.html next to it (markdown-it-py, which rich already depends on; tables enabled)."""
    from markdown_it import MarkdownIt

    md_path = Path(md_path)
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(md_path.read_text(encoding="utf-8"))
    first = md_path.read_text(encoding="utf-8").splitlines()[0].lstrip("# ").strip()
    page = (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(first)}</title>"
            f"<style>{_CSS}</style></head><body>\n{body}</body></html>\n")
    out = md_path.with_suffix(".html")
    out.write_text(page, encoding="utf-8")
    return out


def metric_table(title: str, results: Sequence, note: str = "") -> Table:
    """A table of MetricResults: name, value, N (settings go to the report's settings block)."""
    return Table(title, ["metric", "value", "N"], [[r.name, r.value, r.n] for r in results], note)
