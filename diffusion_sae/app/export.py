"""A feature dashboard as a self-contained folder: open index.html from a disk or a zip, offline.

    index.html            features (thumbnail, density, top concept) and concepts -> features
    features/<j>.html     the explorer's feature card for j, verbatim
    style.css             the one stylesheet
    features.json         the numbers behind the pages (top images, scores, concepts)

Images are PNG data URIs inside the pages; links are relative; no script, no external URL.

The folder also holds MARKER (`.diffusion-sae-dashboard`): an existing --out folder is replaced only
if it carries it (a previous export) or is empty; any other folder is refused, never deleted.
"""
from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import DiffusionSAEError
from .render import CSS, feature_card, heatmap_overlay, png_uri, search_results

MARKER = ".diffusion-sae-dashboard"


class ExportError(DiffusionSAEError, ValueError):
    """The output folder cannot be written or replaced (one line: what, where, how to fix)."""


def _package_dir() -> Path:
    return Path(__file__).resolve().parent.parent


def check_target(out: str | Path) -> Path:
    """Refuse an --out that may not be (re)written, before any work: a folder that is not a previous
    dashboard export (no MARKER) and not empty, a file, a path inside the installed package, or a
    parent folder that cannot be written. Returns out."""
    out = Path(out)
    res = out.resolve()
    if res == _package_dir() or _package_dir() in res.parents:
        raise ExportError(f"--out {out}: inside the installed diffusion_sae package; choose a folder of your own")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"--out {out}: exists and is not a folder; choose a new folder name")
    if out.is_dir() and not (out / MARKER).is_file() and any(out.iterdir()):
        raise ExportError(f"--out {out}: the folder exists and is not a dashboard export (no {MARKER} file), "
                          "so it is left untouched; choose a new or empty folder")
    parent = res.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"--out {out}: cannot write in {parent} (permission denied); choose a writable folder")
    return out


def _page(title: str, body: str, css: str) -> str:
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<link rel="stylesheet" href="{css}"></head><body>{body}</body></html>')


def feature_summary(f: int, stats, index=None, n_images: int = 8) -> dict:
    tops = stats.top_images(f, n_images)
    return {"feature": f, "density": stats.density(f),
            "top_images": [{"index": t.index, "prompt": t.prompt, "seed": t.seed, "score": t.score} for t in tops],
            "step_curve": stats.step_curve(f).tolist(),
            "concepts": [vars(h) for h in index.top_concepts(f)] if index is not None else []}


def export_dashboard(out: str | Path, stats, index=None, features: list[int] | None = None, n_features: int = 16,
                     n_images: int = 8) -> Path:
    """Write the dashboard folder; returns index.html.

    An existing `out` is replaced only if it is a previous export (it holds MARKER) or empty; anything
    else raises ExportError and is left as it is. The pages are written into a temporary folder beside
    `out` (removed if anything fails) and renamed into place."""
    out = check_target(out)
    feats = [stats.check(f) for f in features] if features else stats.top_features(n_features)
    if not feats:
        raise ValueError("no feature to export: none fires on the prompt set")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write(tmp, out, stats, index, feats, n_images)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "index.html"


def _write(tmp: Path, out: Path, stats, index, feats: list[int], n_images: int) -> None:
    (tmp / "features").mkdir()
    (tmp / "style.css").write_text(CSS + "body{margin:16px;font-family:system-ui,sans-serif}"
                                   ".feature-row img{width:64px;height:64px;image-rendering:pixelated}\n")
    rows, summary = [], []
    for f in feats:
        card = feature_card(f, stats, index, n_images)
        nav = '<p><a href="../index.html">&larr; all features</a></p>'
        (tmp / "features" / f"{f}.html").write_text(_page(f"feature {f}", nav + card, "../style.css"))
        s = feature_summary(f, stats, index, n_images)
        summary.append(s)
        thumb = ""
        if s["top_images"]:
            t = stats.top_images(f, 1)[0]
            thumb = f'<img alt="top image" src="{png_uri(heatmap_overlay(stats.images[t.index].numpy(), t.heatmap.numpy(), float(t.heatmap.max())), 2)}"/>'
        top = s["concepts"][0]["concept"] if s["concepts"] else "–"
        rows.append(f'<tr class="feature-row" data-feature="{f}"><td><a href="features/{f}.html">feature {f}</a></td>'
                    f"<td>{thumb}</td><td>{s['density']:.0%}</td><td>{html.escape(top)}</td></tr>")
    body = [f"<h1>Feature dashboard</h1><p>{html.escape(stats.hookpoint)} · {len(stats)} images · "
            f"{stats.meta.get('steps', len(stats.timesteps))} steps</p>",
            '<table class="concepts"><tr><th>feature</th><th>top image + heatmap</th><th>fires in</th>'
            "<th>top concept</th></tr>", *rows, "</table>"]
    if index is not None:
        shown = set(feats)
        body.append("<h2>Concepts → features</h2>")
        for c in index.concepts:
            concept, hits = index.search(c, n=5)
            # Only features that have a page get a link; the others are listed by number.
            body.append(search_results(concept, hits, link=lambda f: f"features/{f}.html" if f in shown else None))
    (tmp / "index.html").write_text(_page("feature dashboard", "".join(body), "style.css"))
    (tmp / "features.json").write_text(json.dumps({"hookpoint": stats.hookpoint, "features": summary}, indent=1))
    (tmp / MARKER).write_text("written by `diffusion-sae dashboard export`; a later export may replace this folder\n")
    check_target(out)  # again: the folder may have changed while the pages were made
    old = None
    if out.exists():  # a previous export (or an empty folder): moved aside, removed once the new one is in place
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "d")
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old / "d", out)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
