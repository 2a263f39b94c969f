"""HTML for one feature: top images with patch heatmaps, activation across steps, top concepts.

The browser app and the static dashboard show the very same fragment (`feature_card`), so what is
shared is what was explored. Everything is inline (PNG data URIs, SVG, one stylesheet string):
no external URL, no script.
"""
from __future__ import annotations

import base64
import html
import io

import numpy as np
from PIL import Image

# Anchors of a dark-to-bright colour map (inferno-like): readable over any ShapesCanvas colour.
_CMAP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)
DISPLAY = 4   # 32x32 images shown at 128x128, nearest neighbour: the pixels are the data

CSS = """
.feature-card{font-family:system-ui,sans-serif;font-size:14px;color:#222}
.feature-card h3{margin:.2em 0 .4em}
.top-images{display:flex;flex-wrap:wrap;gap:10px}
.top-image{margin:0;display:flex;flex-direction:column;align-items:center;width:264px}
.top-image .pair{display:flex;gap:4px}
.top-image img{width:128px;height:128px;image-rendering:pixelated;border:1px solid #ccc}
.top-image figcaption{font-size:12px;text-align:center;margin-top:2px}
.concepts{border-collapse:collapse;margin-top:6px}
.concepts td,.concepts th{border:1px solid #ddd;padding:2px 8px;text-align:left}
.step-plot{margin-top:6px}
.muted{color:#777}
"""


def png_uri(pixels: np.ndarray, scale: int = DISPLAY) -> str:
    """uint8 [H, W, 3] -> data:image/png;base64,... (upscaled, nearest)."""
    im = Image.fromarray(np.ascontiguousarray(pixels))
    if scale != 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def colormap(v: np.ndarray) -> np.ndarray:
    """[..] values in [0, 1] -> [.., 3] uint8."""
    x = np.clip(v, 0, 1) * (len(_CMAP) - 1)
    i = np.minimum(np.floor(x).astype(int), len(_CMAP) - 2)
    f = (x - i)[..., None]
    return (_CMAP[i] * (1 - f) + _CMAP[i + 1] * f).round().astype(np.uint8)


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, vmax: float, alpha: float = 0.6) -> np.ndarray:
    """The patch heatmap [h, w] upsampled (nearest: one block per patch) over the image [H, W, 3]."""
    H, W = image.shape[:2]
    h, w = heat.shape
    up = np.kron(heat / max(vmax, 1e-8), np.ones((H // h, W // w), dtype=np.float32))
    col = colormap(up).astype(np.float32)
    return (alpha * col + (1 - alpha) * image.astype(np.float32)).round().astype(np.uint8)


def step_plot_svg(curves: dict[str, list[float]], width: int = 420, height: int = 160) -> str:
    """A line plot of activation per denoising step (x: step 0 = noisiest), as inline SVG."""
    colours = ["#d1495b", "#00798c", "#edae49", "#30638e"]
    n = max((len(c) for c in curves.values()), default=0)
    top = max((max(c) for c in curves.values() if c), default=0.0) or 1.0
    left, r, t, b = 40, 10, 10, 28
    pw, ph = width - left - r, height - t - b

    def xy(i, v):
        return left + (pw * i / max(n - 1, 1)), t + ph * (1 - v / top)

    parts = [f'<svg class="step-plot" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="activation across denoising steps">',
             f'<rect x="{left}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#bbb"/>',
             f'<text x="{left - 4}" y="{t + 8}" font-size="10" text-anchor="end">{top:.2g}</text>',
             f'<text x="{left - 4}" y="{t + ph}" font-size="10" text-anchor="end">0</text>',
             f'<text x="{left + pw / 2}" y="{height - 4}" font-size="11" text-anchor="middle">denoising step '
             f'(0 … {n - 1})</text>']
    for k, (label, c) in enumerate(curves.items()):
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, v) for i, v in enumerate(c)))
        colour = colours[k % len(colours)]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>')
        # Legend top right: curves start high at the noisy end (left), where a legend would cover them.
        parts.append(f'<text x="{left + pw - 6}" y="{t + 14 + 13 * k}" font-size="11" text-anchor="end" '
                     f'fill="{colour}">{html.escape(label)}</text>')
    parts.append("</svg>")
    # No xmlns: inline SVG in HTML5 needs none, and the page then holds no URL at all.
    return "".join(parts)


def feature_card(f: int, stats, index=None, n_images: int = 8) -> str:
    """The HTML card of feature f (stats: FeatureStats; index: ConceptIndex or None)."""
    f = stats.check(f)
    tops = stats.top_images(f, n_images)
    esc = html.escape
    out = [f'<div class="feature-card" data-feature="{f}">',
           f"<h3>Feature {f} <span class='muted'>@ {esc(stats.hookpoint)}</span></h3>",
           f"<p>fires in {stats.density(f):.0%} of {len(stats)} images "
           f"({stats.meta.get('steps', len(stats.timesteps))} steps each)</p>"]
    if not tops:
        out.append("<p class='muted no-images'>This feature does not fire on any image of the prompt set.</p>")
    else:
        vmax = max(float(t.heatmap.max()) for t in tops)
        out.append('<div class="top-images">')
        for t in tops:
            img = stats.images[t.index].numpy()
            over = heatmap_overlay(img, t.heatmap.numpy(), vmax)
            out.append(f'<figure class="top-image" data-image="{t.index}" data-score="{t.score:.6g}">'
                       f'<div class="pair"><img class="image" alt="generated image" src="{png_uri(img)}"/>'
                       f'<img class="heatmap" alt="patch heatmap" src="{png_uri(over)}"/></div>'
                       f"<figcaption>{esc(t.prompt)} · seed {t.seed} · mean {t.score:.3g}</figcaption></figure>")
        out.append("</div>")
    curves = {"all images": stats.step_curve(f).tolist()}
    if tops:
        curves[f"top {len(tops)} images"] = stats.step_curve(f, [t.index for t in tops]).tolist()
    out.append("<h4>Activation across denoising steps (mean over patches)</h4>" + step_plot_svg(curves))
    if index is not None:
        hits = index.top_concepts(f)
        out.append("<h4>Concepts whose dictionary scores rank it highest</h4>")
        if hits:
            out.append('<table class="concepts"><tr><th>concept</th><th>kind</th><th>score</th>'
                       "<th>rank among the concept's features</th></tr>")
            out += [f'<tr data-concept="{esc(h.concept)}"><td>{esc(h.concept)}</td><td>{esc(h.kind)}</td>'
                    f"<td>{h.score:.3g}</td><td>{h.rank}</td></tr>" for h in hits]
            out.append("</table>")
        else:
            out.append("<p class='muted'>No concept scores this feature above the others.</p>")
    out.append("</div>")
    return "".join(out)


def search_results(concept: str, hits: list[tuple[int, float]], link=None) -> str:
    """The features of a concept as a small table; link(f) gives an href or None (no link)."""
    esc = html.escape
    rows = []
    for f, s in hits:
        href = link(f) if link else None
        name = f'<a href="{esc(href)}">{f}</a>' if href else str(f)
        rows.append(f'<tr data-feature="{f}"><td>{name}</td><td>{s:.3g}</td></tr>')
    body = "".join(rows) or "<tr><td colspan=2 class='muted'>no feature scores positively</td></tr>"
    return (f'<div class="search-results" data-concept="{esc(concept)}"><b>{esc(concept)}</b>: features by dictionary '
            f'score<table class="concepts"><tr><th>feature</th><th>score</th></tr>{body}</table></div>')
