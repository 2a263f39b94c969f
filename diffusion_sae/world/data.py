"""Procedural ShapesCanvas images: one object, one style, one colour, random placement and background.

Everything is batched torch and deterministic from a `torch.Generator`, so a training batch is a
pure function of (seed, step) and a resumed run sees exactly the data an uninterrupted one would.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .config import (ALIASES, COLOURS, COLOUR_NAMES, FULL_TEMPLATES, IMAGE_SIZE, OBJECTS,
                     P_CANONICAL, PARTIAL_TEMPLATES, STYLES, caption)

_TEMPLATE_RES = 128


def _star(cx, cy, r_out, r_in, n=5):
    pts = []
    for i in range(2 * n):
        r = r_out if i % 2 == 0 else r_in
        a = -math.pi / 2 + i * math.pi / n
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _draw(name: str, s: int) -> np.ndarray:
    """Binary mask of one object at s x s (drawn with PIL at 4x, then area-averaged)."""
    big = 4 * s
    img = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(img)
    u = big / 128.0  # the shapes below are laid out on a 128 grid

    def P(*xy):
        return [(x * u, y * u) for x, y in xy]

    if name == "circle":
        d.ellipse(P((8, 8), (120, 120)), fill=255)
    elif name == "square":
        d.rectangle(P((16, 16), (112, 112)), fill=255)
    elif name == "triangle":
        d.polygon(P((64, 6), (122, 114), (6, 114)), fill=255)
    elif name == "star":
        d.polygon(P(*_star(64, 70, 64, 26)), fill=255)
    elif name == "heart":
        d.ellipse(P((10, 14), (66, 70)), fill=255)
        d.ellipse(P((62, 14), (118, 70)), fill=255)
        d.polygon(P((13, 54), (115, 54), (64, 120)), fill=255)
    elif name == "cross":
        d.rectangle(P((44, 6), (84, 122)), fill=255)
        d.rectangle(P((6, 44), (122, 84)), fill=255)
    elif name == "ring":
        d.ellipse(P((6, 6), (122, 122)), fill=255)
        d.ellipse(P((38, 38), (90, 90)), fill=0)
    elif name == "diamond":
        d.polygon(P((64, 2), (112, 64), (64, 126), (16, 64)), fill=255)
    elif name == "crescent":
        d.ellipse(P((6, 6), (122, 122)), fill=255)
        d.ellipse(P((44, -6), (140, 90)), fill=0)
    elif name == "arrow":
        d.rectangle(P((6, 48), (70, 80)), fill=255)
        d.polygon(P((62, 14), (124, 64), (62, 114)), fill=255)
    else:  # pragma: no cover - config and drawing are kept in sync by a test
        raise ValueError(f"no drawing for object {name!r}")
    a = np.asarray(img, dtype=np.float32) / 255.0
    return a.reshape(s, 4, s, 4).mean(axis=(1, 3))


@functools.lru_cache(maxsize=1)
def object_masks() -> torch.Tensor:
    """[n_objects, 1, R, R] high-resolution masks, one per object, in OBJECTS order."""
    return torch.from_numpy(np.stack([_draw(o, _TEMPLATE_RES) for o in OBJECTS]))[:, None]


@dataclass
class Batch:
    images: torch.Tensor        # [N, 3, H, W] in [0, 1]
    objects: torch.Tensor       # [N] index into OBJECTS
    styles: torch.Tensor        # [N] index into STYLES
    colours: torch.Tensor       # [N] index into COLOUR_NAMES
    captions: list[str]


def _texture(style: torch.Tensor, xx, yy, px, py, g: torch.Generator) -> torch.Tensor:
    """Per-pixel brightness multiplier in [0, 1] for each sample's style. [N, 1, H, W]."""
    n = style.shape[0]
    h, w = xx.shape[-2:]
    x = xx + px
    y = yy + py
    dark = 0.22
    out = torch.ones(n, 1, h, w)
    tex = {
        "striped": torch.where(((x + y) % 6) < 3, 1.0, dark),
        "dotted": torch.where(((x % 5) < 2) & ((y % 5) < 2), 1.0, dark),
        "checkered": torch.where(((torch.div(x, 4, rounding_mode="floor")
                                   + torch.div(y, 4, rounding_mode="floor")) % 2) == 0, 1.0, dark),
        "wavy": torch.where(torch.sin(2 * math.pi * (y + 1.6 * torch.sin(2 * math.pi * x / 9)) / 6) > 0,
                            1.0, dark),
    }
    noise = torch.rand(n, 1, h, w, generator=g) * 0.85 + 0.15
    for i, name in enumerate(STYLES):
        sel = style == i
        if not bool(sel.any()):
            continue
        if name in tex:
            out[sel] = tex[name][sel]
        elif name == "noisy":
            out[sel] = noise[sel]
    return out


def render(objects: torch.Tensor, styles: torch.Tensor, colours: torch.Tensor,
           generator: torch.Generator, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Render N images [N, 3, size, size] in [0, 1] for the given concept indices."""
    n = objects.shape[0]
    g = generator
    rnd = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731

    # Placement: object half-size in normalised units (image spans [-1, 1]) and a centre that
    # keeps the object inside the frame.
    half = 0.55 + 0.30 * rnd(n)
    cx = (rnd(n) * 2 - 1) * (1 - half)
    cy = (rnd(n) * 2 - 1) * (1 - half)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1 / half
    theta[:, 1, 1] = 1 / half
    theta[:, 0, 2] = -cx / half
    theta[:, 1, 2] = -cy / half
    grid = F.affine_grid(theta, (n, 1, size, size), align_corners=False)
    masks = object_masks()[objects]
    m = F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # Background: a dark, slightly tinted tone, never close to an object colour.
    grey = 0.05 + 0.30 * rnd(n, 1, 1, 1)
    tint = (rnd(n, 3, 1, 1) - 0.5) * 0.10
    bg = (grey + tint).clamp(0, 1).expand(n, 3, size, size)

    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                            torch.arange(size, dtype=torch.float32), indexing="ij")
    px = torch.floor(rnd(n, 1, 1, 1) * 12)
    py = torch.floor(rnd(n, 1, 1, 1) * 12)
    bright = _texture(styles, xs.expand(n, 1, size, size), ys.expand(n, 1, size, size), px, py, g)

    grad_sel = styles == STYLES.index("gradient")
    if bool(grad_sel.any()):
        # Ramp left -> right across the object's own extent.
        left = (cx - half + 1) / 2 * size
        width = half * size
        t = ((xs[None, None] - left[:, None, None, None]) / width[:, None, None, None]).clamp(0, 1)
        bright[grad_sel] = (0.12 + 0.88 * t)[grad_sel]

    out_sel = styles == STYLES.index("outlined")
    if bool(out_sel.any()):
        hard = (m > 0.5).float()
        eroded = -F.max_pool2d(-hard, kernel_size=5, stride=1, padding=2)
        edge = (m * (1 - eroded))
        m = torch.where(out_sel[:, None, None, None], edge, m)

    rgb = torch.tensor([COLOURS[c] for c in COLOUR_NAMES])[colours][:, :, None, None]
    fill = rgb * bright
    img = bg * (1 - m) + fill * m
    return img.clamp(0, 1)


def sample_concepts(n: int, generator: torch.Generator):
    o = torch.randint(len(OBJECTS), (n,), generator=generator)
    s = torch.randint(len(STYLES), (n,), generator=generator)
    c = torch.randint(len(COLOUR_NAMES), (n,), generator=generator)
    return o, s, c


def make_captions(objects, styles, colours, generator: torch.Generator,
                  p_partial: float = 0.3, p_canonical: float = P_CANONICAL) -> list[str]:
    """One caption per sample; with probability p_partial some attributes are left out.

    Each named attribute uses its canonical name with probability p_canonical and one of its
    aliases otherwise (ShapesCanvas v2), so the model knows every name of every concept.
    """
    partial_keys = list(PARTIAL_TEMPLATES)
    u = torch.rand(len(objects), generator=generator).tolist()
    pick = torch.randint(1 << 30, (len(objects), 2), generator=generator).tolist()
    # One uniform draw per attribute decides its name: < p_canonical canonical, else an alias.
    name_u = torch.rand(len(objects), 3, generator=generator).tolist()

    def name(concept: str, v: float) -> str:
        if v < p_canonical:
            return concept
        aliases = ALIASES[concept]
        return aliases[min(len(aliases) - 1, int((v - p_canonical) / (1 - p_canonical) * len(aliases)))]

    caps = []
    for i, (o, s, c) in enumerate(zip(objects.tolist(), styles.tolist(), colours.tolist())):
        obj, sty, col = (name(n, v) for n, v in zip((OBJECTS[o], STYLES[s], COLOUR_NAMES[c]), name_u[i]))
        if u[i] < p_partial:
            keys = partial_keys[pick[i][0] % len(partial_keys)]
            ts = PARTIAL_TEMPLATES[keys]
            t = ts[pick[i][1] % len(ts)]
            caps.append(caption(obj if "object" in keys else None, sty if "style" in keys else None,
                                col if "colour" in keys else None, t))
        else:
            caps.append(caption(obj, sty, col, FULL_TEMPLATES[pick[i][1] % len(FULL_TEMPLATES)]))
    return caps


def sample_batch(n: int, seed: int, step: int = 0, p_partial: float = 0.3) -> Batch:
    """The batch for (seed, step): a pure function of its arguments."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    o, s, c = sample_concepts(n, g)
    imgs = render(o, s, c, g)
    caps = make_captions(o, s, c, g, p_partial=p_partial)
    return Batch(imgs, o, s, c, caps)


def batch_for(objects: list[int], styles: list[int], colours: list[int], seed: int) -> Batch:
    """Images for given concept indices (e.g. a classifier test set), deterministic from seed."""
    g = torch.Generator().manual_seed(int(seed))
    o, s, c = (torch.as_tensor(v, dtype=torch.long) for v in (objects, styles, colours))
    imgs = render(o, s, c, g)
    caps = [caption(OBJECTS[a], STYLES[b], COLOUR_NAMES[d], FULL_TEMPLATES[0])
            for a, b, d in zip(o.tolist(), s.tolist(), c.tolist())]
    return Batch(imgs, o, s, c, caps)
