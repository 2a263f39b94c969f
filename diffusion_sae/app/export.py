"""A feature dashboard as a self-contained folder: open index.html from a disk or a zip, offline.

    index.html            features (thumbnail, density, top concept) and concepts -> features
    features/<j>.html     the explorer's feature card for j, verbatim
    style.css             the one stylesheet
    features.json         the numbers behind the pages (top images, scores, concepts)

Images are PNG data URIs inside the pages; links are relative; no script, no external URL.
"""
from __future__ import annotations

import html
import json
import os
import shutil
from pathlib import Path

from .render import CSS, feature_card, heatmap_overlay, png_uri, search_results


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
    """Write the dashboard folder (replacing one that is there); returns index.html."""
    out = Path(out)
    feats = [stats.check(f) for f in features] if features else stats.top_features(n_features)
    if not feats:
        raise ValueError("no feature to export: none fires on the prompt set")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "features").mkdir(parents=True)
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
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out / "index.html"
