"""ShapesCanvas concepts and caption templates: the one place they are defined.

ShapesCanvas is our small, offline stand-in for UnlearnCanvas: every image is one object, drawn in
one style and one colour on a random background, so every concept has an exact label.
"""
from __future__ import annotations

OBJECTS: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "heart",
    "cross", "ring", "diamond", "crescent", "arrow",
)
STYLES: tuple[str, ...] = (
    "solid", "striped", "dotted", "checkered",
    "outlined", "gradient", "noisy", "wavy",
)
# RGB in [0, 1]; chosen far apart in hue so that every style keeps the colour readable.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.35, 0.95),
    "yellow": (0.95, 0.88, 0.10),
    "purple": (0.62, 0.20, 0.85),
    "orange": (1.00, 0.55, 0.05),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

# World v2: every concept has two more names used in training captions. Building steering matrices,
# dictionaries and presets, and tuning, use only the canonical names above; evaluation also asks
# with these held-out names, so an erasure that only matches the canonical word is caught.
ALIASES: dict[str, tuple[str, str]] = {
    # objects
    "circle": ("disc", "orb"), "square": ("box", "tile"), "triangle": ("wedge", "trigon"),
    "star": ("pentagram", "sparkle"), "heart": ("valentine", "cardioid"),
    "cross": ("plus", "cruciform"), "ring": ("donut", "hoop"), "diamond": ("rhombus", "lozenge"),
    "crescent": ("moon", "sickle"), "arrow": ("pointer", "dart"),
    # styles
    "solid": ("plain", "filled"), "striped": ("banded", "stripy"), "dotted": ("spotted", "polka"),
    "checkered": ("chequered", "chessboard"), "outlined": ("hollow", "contour"),
    "gradient": ("faded", "ombre"), "noisy": ("grainy", "speckled"), "wavy": ("rippled", "squiggly"),
    # colours
    "red": ("crimson", "scarlet"), "green": ("emerald", "lime"), "blue": ("azure", "cobalt"),
    "yellow": ("golden", "lemon"), "purple": ("violet", "lilac"), "orange": ("amber", "tangerine"),
}
# How often a training caption uses the canonical name (the rest split evenly over the aliases).
P_CANONICAL = 0.5


def names_of(concept: str) -> tuple[str, ...]:
    """Every name of a concept: the canonical one first, then its held-out aliases."""
    return (concept, *ALIASES[concept])


def canonical_of(name: str) -> str:
    """The canonical concept a name (canonical or alias) stands for."""
    if name in ALIASES:
        return name
    for concept, aliases in ALIASES.items():
        if name in aliases:
            return concept
    raise KeyError(f"{name!r} is not a ShapesCanvas concept name")


# Captions naming all three attributes. `{a}` is "a"/"an" for the word that follows it.
FULL_TEMPLATES: tuple[str, ...] = (
    "a {colour} {object} in {style} style",
    "{style} {colour} {object}",
    "an image of a {object}, {colour}, {style}",
    "a {style} {object} in {colour}",
    "a {object} in {style} style, {colour}",
)
# Captions that leave attributes out, so the model also learns the marginals ("a red star").
PARTIAL_TEMPLATES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("object", "colour"): ("a {colour} {object}", "an image of a {colour} {object}"),
    ("object", "style"): ("a {object} in {style} style", "{style} {object}"),
    ("object",): ("a {object}", "an image of a {object}"),
    # v2: the object left out too, so the model learns every marginal, down to the empty prompt.
    ("style", "colour"): ("a {colour} shape in {style} style", "{style} {colour} shape"),
    ("colour",): ("a {colour} shape", "an image of something {colour}"),
    ("style",): ("a shape in {style} style", "something {style}"),
    (): ("a shape", "an image"),
}
# The prompt used by evaluation (UnlearnCanvas uses "A {object} image in {style} style.").
EVAL_TEMPLATE = "a {colour} {object} in {style} style"

IMAGE_SIZE = 32

# Sampling defaults of the bundled pipeline. World v2 samples at guidance 2: at guidance 5 a prompt that
# leaves the style out gave "solid" in 75 % of images (62 % at 4, 53 % at 3, 33 % at 2; 60 images each),
# because strong guidance pulls an unnamed texture to the textureless mean; at 2 named prompts still
# give >= 99 % of the attributes they ask for (`diffusion-sae world eval`).
STEPS = 25
GUIDANCE = 2.0


def caption(obj: str | None, style: str | None, colour: str | None, template: str) -> str:
    text = template.format(object=obj or "", style=style or "", colour=colour or "")
    # "a orange ..." -> "an orange ..."; keeps the captions grammatical for the tokenizer.
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] == "a" and words[i + 1][:1] in "aeiou":
            words[i] = "an"
    return " ".join(words)


def eval_prompt(obj: str, style: str, colour: str) -> str:
    return caption(obj, style, colour, EVAL_TEMPLATE)


def vocabulary_words() -> list[str]:
    """Every word a ShapesCanvas caption can contain (used to build the tokenizer)."""
    words: set[str] = set(OBJECTS) | set(STYLES) | set(COLOURS)
    words |= {a for aliases in ALIASES.values() for a in aliases}
    templates = list(FULL_TEMPLATES) + [t for ts in PARTIAL_TEMPLATES.values() for t in ts]
    for t in templates:
        for w in t.replace(",", " ").split():
            if not w.startswith("{"):
                words.add(w)
    words |= {"an", "a", "image", "of", "in", "style", "photo", "picture", "painting", "shape"}
    return sorted(words)
