"""UnlearnCanvas harness pieces: names, prompt templates, file naming, classifiers, UA / IRA / CRA.

Definitions (evaluation.md §5, algorithms.md §3.7), acc_S(s) = share of images prompted with style s that
the style classifier labels s; acc_O(o) likewise for objects (argmax over all 51 / 20 labels):
- style unlearning, target s*: UA = 1 − acc_S(s*); IRA = mean over the other styles of acc_S;
  CRA = mean over objects of acc_O (SAeUron: on the unstyled `An image of {o}.` images; original
  UnlearnCanvas: on the styled images).
- object unlearning, target o*: UA = 1 − acc_O(o*); IRA = mean over the other objects of acc_O;
  CRA = mean over styles of acc_S (styled images).
Benchmark numbers are means over targets.

Classifiers: the release's fine-tuned timm `vit_large_patch16_224.augreg_in21k` (heads 51 / 20), loaded
into our own plain-torch ViT with timm's state-dict layout (timm and torchvision break diffusers here).
Checkpoints are user-provided (Google Drive only).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .metrics import AssetError, MetricInputError, accuracy_by_label, file_sha256

STYLES = (
    "Abstractionism", "Artist_Sketch", "Blossom_Season", "Bricks", "Byzantine", "Cartoon", "Cold_Warm",
    "Color_Fantasy", "Comic_Etch", "Crayon", "Cubism", "Dadaism", "Dapple", "Defoliation", "Early_Autumn",
    "Expressionism", "Fauvism", "French", "Glowing_Sunset", "Gorgeous_Love", "Greenfield", "Impressionism",
    "Ink_Art", "Joy", "Liquid_Dreams", "Magic_Cube", "Meta_Physics", "Meteor_Shower", "Monet", "Mosaic",
    "Neon_Lines", "On_Fire", "Pastel", "Pencil_Drawing", "Picasso", "Pop_Art", "Red_Blue_Ink", "Rust", "Sketch",
    "Sponge_Dabbed", "Structuralism", "Superstring", "Surrealism", "Ukiyoe", "Van_Gogh", "Vibrant_Flow",
    "Warm_Love", "Warm_Smear", "Watercolor", "Winter")
# Style classifier labels: the 50 styles + Seed_Images, alphabetical (Seed_Images lands at index 38).
THEMES = tuple(sorted(STYLES + ("Seed_Images",)))
OBJECTS = ("Architectures", "Bears", "Birds", "Butterfly", "Cats", "Dogs", "Fishes", "Flame", "Flowers", "Frogs",
           "Horses", "Human", "Jellyfish", "Rabbits", "Sandwiches", "Sea", "Statues", "Towers", "Trees", "Waterfalls")
SEEDS = (188, 288, 588, 688, 888)
GENERATION = {"sampler": "DDIM", "steps": 100, "eta": 0.0, "guidance": 9.0, "height": 512, "width": 512}
assert THEMES.index("Seed_Images") == 38 and len(THEMES) == 51


def prompt(style: str | None, obj: str, convention: str = "saeuron") -> str:
    """The generation prompt. saeuron: `An image of {object} in {style with spaces} style.` / `An image of
    {object}.` (the official SAeUron sampling, sweep and dictionary scripts all write `theme.replace('_', ' ')`);
    unlearncanvas: `A {object} image in {style with spaces} style.`"""
    if convention == "saeuron":
        return f"An image of {obj}." if style is None else f"An image of {obj} in {style.replace('_', ' ')} style."
    if convention == "unlearncanvas":
        if style is None:
            raise MetricInputError("the original UnlearnCanvas protocol has no unstyled prompts")
        return f"A {obj} image in {style.replace('_', ' ')} style."
    raise MetricInputError(f"unknown prompt convention {convention!r} (saeuron or unlearncanvas)")


def filename(style: str | None, obj: str, seed: int, ext: str = "jpg") -> str:
    return f"{obj}_seed{seed}.{ext}" if style is None else f"{style}_{obj}_seed{seed}.{ext}"


_NAME = re.compile(r"^(?:(?P<style>.+)_)?(?P<obj>[A-Za-z]+)_seed(?P<seed>\d+)$")


def parse_filename(name: str) -> tuple[str | None, str, int]:
    """`{style}_{object}_seed{seed}.jpg` or `{object}_seed{seed}.jpg` -> (style or None, object, seed)."""
    m = _NAME.match(Path(name).stem)
    if not m or m["obj"] not in OBJECTS or (m["style"] is not None and m["style"] not in THEMES):
        raise MetricInputError(f"{name}: not an UnlearnCanvas image name ({{Style}}_{{Object}}_seed{{N}}.jpg "
                               "with a known style/object)")
    return m["style"], m["obj"], int(m["seed"])


@dataclass
class AnswerItem:
    style: str | None
    obj: str
    seed: int
    prompt: str
    file: str


def answer_set(styles: Sequence[str] = STYLES, objects: Sequence[str] = OBJECTS, seeds: Sequence[int] = SEEDS,
               convention: str = "saeuron", unstyled: bool | None = None) -> list[AnswerItem]:
    """Every image to generate for one unlearned model: styles × objects × seeds (+ unstyled for SAeUron)."""
    unstyled = convention == "saeuron" if unstyled is None else unstyled
    items = [AnswerItem(s, o, sd, prompt(s, o, convention), filename(s, o, sd))
             for s in styles for o in objects for sd in seeds]
    if unstyled:
        items += [AnswerItem(None, o, sd, prompt(None, o, convention), filename(None, o, sd))
                  for o in objects for sd in seeds]
    return items


# ---------------------------------------------------------------------------------------------
# UA / IRA / CRA from predictions
# ---------------------------------------------------------------------------------------------
@dataclass
class UnlearningScores:
    target: str
    task: str
    ua: float
    ira: float
    cra: float
    n_target: int
    n_ira: int
    n_cra: int

    def as_row(self) -> dict:
        return {"target": self.target, "task": self.task, "UA": self.ua, "IRA": self.ira, "CRA": self.cra}


def _scores(task: str, target: Hashable, in_pred, in_true, cross_pred, cross_true) -> UnlearningScores:
    acc_in = accuracy_by_label(in_pred, in_true)
    acc_cross = accuracy_by_label(cross_pred, cross_true)
    if target not in acc_in:
        raise MetricInputError(f"no images prompted with the unlearned {task} {target!r}")
    others = [v for k, v in acc_in.items() if k != target]
    if not others:
        raise MetricInputError(f"IRA needs images of at least one {task} other than {target!r}")
    if not acc_cross:
        raise MetricInputError("CRA needs at least one image for the other classifier")
    n_target = sum(1 for t in in_true if t == target)
    return UnlearningScores(str(target), task, 1.0 - acc_in[target], sum(others) / len(others),
                            sum(acc_cross.values()) / len(acc_cross), n_target, len(in_true) - n_target,
                            len(cross_true))


def style_unlearning_scores(style_pred, style_true, object_pred, object_true, target: str) -> UnlearningScores:
    """Style s* unlearned. style_*: style-classifier predictions / prompted styles of the styled images;
    object_*: object-classifier predictions / prompted objects of the CRA images (unstyled for SAeUron)."""
    return _scores("style", target, style_pred, style_true, object_pred, object_true)


def object_unlearning_scores(object_pred, object_true, style_pred, style_true, target: str) -> UnlearningScores:
    """Object o* unlearned. object_*: object-classifier predictions / prompted objects (styled + unstyled);
    style_*: style-classifier predictions / prompted styles of the styled images."""
    return _scores("object", target, object_pred, object_true, style_pred, style_true)


def mean_scores(scores: Sequence[UnlearningScores]) -> dict[str, float]:
    if not scores:
        raise MetricInputError("no unlearning targets to average")
    n = len(scores)
    return {"UA": sum(s.ua for s in scores) / n, "IRA": sum(s.ira for s in scores) / n,
            "CRA": sum(s.cra for s in scores) / n, "targets": n}


# ---------------------------------------------------------------------------------------------
# classifiers: ViT with timm's parameter names
# ---------------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, mlp)
        self.mlp.fc2 = nn.Linear(mlp, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.attn.proj(a)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class ViTClassifier(nn.Module):
    """timm VisionTransformer (class token, pre-norm, token pooling) with matching state-dict keys."""

    def __init__(self, num_classes: int, img_size: int = 224, patch: int = 16, dim: int = 1024, depth: int = 24,
                 heads: int = 16, mlp: int = 4096):
        super().__init__()
        self.img_size, self.patch = img_size, patch
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList([_Block(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def load_classifier(checkpoint: str | Path, kind: str, heads: int = 16, device: str = "cpu",
                    trust_checkpoint: bool = False) -> ViTClassifier:
    """Load `style50.pth` (kind='style', 51 labels) or `style50_cls.pth` (kind='object', 20 labels).

    Width, depth, patch and MLP size are read from the state dict; the head count cannot be, so it is
    an argument (16 for ViT-L/16). `trust_checkpoint` allows full unpickling for checkpoints that hold
    more than tensors (only for files you trust).
    """
    n_labels = {"style": len(THEMES), "object": len(OBJECTS)}.get(kind)
    if n_labels is None:
        raise MetricInputError(f"classifier kind must be 'style' or 'object', got {kind!r}")
    checkpoint = Path(checkpoint)
    fname = "style50.pth" if kind == "style" else "style50_cls.pth"
    if not checkpoint.is_file():
        raise AssetError(f"UnlearnCanvas {kind} classifier {checkpoint} not found: provide the release's "
                         f"{fname} (timm ViT-L/16 fine-tuned, key model_state_dict)")
    try:
        ck = torch.load(checkpoint, map_location="cpu", weights_only=not trust_checkpoint)
    except Exception as e:
        raise AssetError(f"{checkpoint}: cannot read ({str(e).splitlines()[0][:100]}); if you trust the file, "
                         "pass trust_checkpoint=True (CLI --trust-checkpoint)") from None
    sd = ck.get("model_state_dict", ck) if isinstance(ck, dict) else None
    if not isinstance(sd, dict) or "patch_embed.proj.weight" not in sd:
        raise AssetError(f"{checkpoint}: no timm ViT state dict (expected key model_state_dict with patch_embed.*)")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    w = sd["patch_embed.proj.weight"]
    dim, patch = w.shape[0], w.shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    n_tok = sd["pos_embed"].shape[1] - 1
    img = int(round(n_tok ** 0.5)) * patch
    if sd["head.weight"].shape[0] != n_labels:
        raise AssetError(f"{checkpoint}: head has {sd['head.weight'].shape[0]} outputs, a {kind} classifier "
                         f"needs {n_labels}; did you swap style50.pth and style50_cls.pth?")
    model = ViTClassifier(n_labels, img, patch, dim, depth, heads, sd["blocks.0.mlp.fc1.weight"].shape[0])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or [u for u in unexpected if not u.startswith(("fc_norm", "head_drop"))]:
        raise AssetError(f"{checkpoint}: state dict does not match a timm ViT (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    model.source = f"{checkpoint} (sha256 {file_sha256(checkpoint)})"
    return model.to(device).eval()


def preprocess(images: Sequence, size: int = 224) -> torch.Tensor:
    """Resize((size,size)) bilinear on PIL, ToTensor, Normalize(0.5, 0.5), as the release's scripts do."""
    import numpy as np
    from PIL import Image

    x = [torch.from_numpy(np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), np.float32) / 255.0)
         for im in images]
    return torch.stack(x).permute(0, 3, 1, 2) * 2 - 1


@torch.no_grad()
def classify(model: ViTClassifier, images: Sequence, labels: Sequence[str], batch_size: int = 32) -> list[str]:
    dev = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        logits = model(preprocess(images[i:i + batch_size], model.img_size).to(dev))
        out += [labels[j] for j in logits.argmax(-1).tolist()]
    return out


def evaluate_folder(folder: str | Path, task: str, target: str, style_clf: ViTClassifier,
                    object_clf: ViTClassifier, cra_images: str = "unstyled") -> UnlearningScores:
    """UA / IRA / CRA for one unlearned target from a folder of answer-set images named by `filename()`.

    cra_images (style task only): 'unstyled' (SAeUron) or 'styled' (original UnlearnCanvas).
    """
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    parsed = [(f, *parse_filename(f.name)) for f in files]
    if not parsed:
        raise MetricInputError(f"no UnlearnCanvas images in {folder}")

    def load(items):
        out = []
        for f, *_ in items:
            with Image.open(f) as im:
                out.append(im.convert("RGB"))
        return out

    styled = [p for p in parsed if p[1] is not None and p[1] != "Seed_Images"]
    unstyled = [p for p in parsed if p[1] is None]
    if task == "style":
        if target not in STYLES:
            raise MetricInputError(f"unknown UnlearnCanvas style {target!r}")
        s_pred = classify(style_clf, load(styled), THEMES)
        cra_set = unstyled if cra_images == "unstyled" else styled
        if not cra_set:
            raise MetricInputError(f"no {cra_images} images for CRA in {folder}")
        o_pred = classify(object_clf, load(cra_set), OBJECTS)
        return style_unlearning_scores(s_pred, [p[1] for p in styled], o_pred, [p[2] for p in cra_set], target)
    if task == "object":
        if target not in OBJECTS:
            raise MetricInputError(f"unknown UnlearnCanvas object {target!r}")
        obj_set = styled + unstyled
        o_pred = classify(object_clf, load(obj_set), OBJECTS)
        s_pred = classify(style_clf, load(styled), THEMES)
        return object_unlearning_scores(o_pred, [p[2] for p in obj_set], s_pred, [p[1] for p in styled], target)
    raise MetricInputError(f"task must be 'style' or 'object', got {task!r}")
