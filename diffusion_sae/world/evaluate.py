"""Prompt following of a ShapesCanvas pipeline, judged by the shipped classifier."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import COLOUR_NAMES, EVAL_TEMPLATE, GUIDANCE, OBJECTS, STEPS, STYLES, eval_prompt

DEFAULT_STEPS = STEPS
DEFAULT_GUIDANCE = GUIDANCE


@dataclass
class PromptSet:
    prompts: list[str]
    seeds: list[int]
    objects: list[int]
    styles: list[int]
    colours: list[int]


def grid_prompts(n_seeds: int = 3, base_seed: int = 0) -> PromptSet:
    """Every object x style pair, colours cycling so every colour appears, n_seeds each."""
    ps = PromptSet([], [], [], [], [])
    for i, _ in enumerate(OBJECTS):
        for j, _ in enumerate(STYLES):
            for s in range(n_seeds):
                c = (i + j + s) % len(COLOUR_NAMES)
                ps.prompts.append(eval_prompt(OBJECTS[i], STYLES[j], COLOUR_NAMES[c]))
                ps.seeds.append(base_seed + s)
                ps.objects.append(i)
                ps.styles.append(j)
                ps.colours.append(c)
    return ps


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int = DEFAULT_STEPS,
             guidance: float = DEFAULT_GUIDANCE, batch_size: int = 64, progress=None,
             **kwargs) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1]; image i depends only on (prompts[i], seeds[i])."""
    out = []
    for i in range(0, len(prompts), batch_size):
        p = prompts[i:i + batch_size]
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        r = pipe(p, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                 output_type="pt", **kwargs)
        out.append(r.images.float().cpu())
        if progress is not None:
            progress(min(i + batch_size, len(prompts)), len(prompts))
    return torch.cat(out)


def alias_prompts(per_alias: int = 5, base_seed: int = 0) -> tuple[PromptSet, list[str]]:
    """For every held-out name (world v2 alias) of every concept, `per_alias` evaluation-template prompts
    naming the concept by that alias, the other attributes canonical and cycling; returns the prompts
    and, per prompt, the kind whose name is an alias."""
    from .config import ALIASES, caption

    kinds = {"object": OBJECTS, "style": STYLES, "colour": COLOUR_NAMES}
    ps, alias_kind = PromptSet([], [], [], [], []), []
    for kind, names in kinds.items():
        for ci, concept in enumerate(names):
            for alias in ALIASES[concept]:
                for s in range(per_alias):
                    idx = {"object": (ci + 3 * s) % len(OBJECTS), "style": (ci + s) % len(STYLES),
                           "colour": (ci + 2 * s) % len(COLOUR_NAMES)}
                    idx[kind] = ci
                    shown = {k: kinds[k][i] for k, i in idx.items()}
                    shown[kind] = alias
                    ps.prompts.append(caption(shown["object"], shown["style"], shown["colour"], EVAL_TEMPLATE))
                    ps.seeds.append(base_seed + s)
                    ps.objects.append(idx["object"])
                    ps.styles.append(idx["style"])
                    ps.colours.append(idx["colour"])
                    alias_kind.append(kind)
    return ps, alias_kind


# The template of a prompt that leaves one attribute out.
LEFT_OUT = {"style": "a {colour} {object}", "object": "a {colour} shape in {style} style",
            "colour": "a {object} in {style} style"}


def left_out_prompts(kind: str, n: int = 60, base_seed: int = 0) -> PromptSet:
    """n prompts that leave `kind` out (its label −1), the other attributes cycling; kind "all": the empty prompt."""
    from .config import caption

    ps = PromptSet([], [], [], [], [])
    for i in range(n):
        idx = {"object": i % len(OBJECTS), "style": (i // 2) % len(STYLES), "colour": (i // 3) % len(COLOUR_NAMES)}
        if kind == "all":
            ps.prompts.append("")
            idx = {k: -1 for k in idx}
        else:
            idx[kind] = -1
            ps.prompts.append(caption(OBJECTS[idx["object"]] if idx["object"] >= 0 else None,
                                      STYLES[idx["style"]] if idx["style"] >= 0 else None,
                                      COLOUR_NAMES[idx["colour"]] if idx["colour"] >= 0 else None, LEFT_OUT[kind]))
        ps.seeds.append(base_seed + i)
        ps.objects.append(idx["object"])
        ps.styles.append(idx["style"])
        ps.colours.append(idx["colour"])
    return ps


def marginal_shares(classifier, images: torch.Tensor, kind: str) -> dict[str, float]:
    """Share of images the judge assigns to each value of `kind`."""
    names = {"object": OBJECTS, "style": STYLES, "colour": COLOUR_NAMES}[kind]
    pred = classifier.predict(images)[kind]
    return {n: float((pred == i).float().mean()) for i, n in enumerate(names)}


def agreement(classifier, images: torch.Tensor, ps: PromptSet) -> dict[str, float]:
    pred = classifier.predict(images)
    truth = {"object": ps.objects, "style": ps.styles, "colour": ps.colours}
    return {k: float((pred[k] == torch.tensor(truth[k])).float().mean()) for k in truth}


def image_grid(images: torch.Tensor, rows: int, cols: int, pad: int = 1) -> torch.Tensor:
    """[rows*cols, 3, H, W] -> one [3, rows*(H+pad), cols*(W+pad)] image."""
    n, c, h, w = images.shape
    g = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for k in range(min(n, rows * cols)):
        r, q = divmod(k, cols)
        g[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[k]
    return g


def save_png(img: torch.Tensor, path, scale: int = 4) -> None:
    from PIL import Image

    arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    im = Image.fromarray(arr)
    if scale != 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    im.save(path)


def evaluate_world(pipe, classifier, seeds: int = 3, per_alias: int = 5, left_out: int = 60,
                   steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, progress=None) -> dict:
    """Prompt following of a ShapesCanvas pipeline on three prompt sets:

    - named: every object x style pair with canonical names (`seeds` each): agreement per attribute;
    - held_out: every alias of every concept (`per_alias` prompts each): agreement on the aliased
      attribute, per kind;
    - left_out: prompts that leave one attribute out (and the empty prompt): the judged share of each
      value of the missing attribute; an honest marginal has no value far above 1 / (number of values).
    """
    out: dict = {}
    named = grid_prompts(seeds)
    imgs = generate(pipe, named.prompts, named.seeds, steps, guidance, progress=progress)
    out["named"] = dict(agreement(classifier, imgs, named), images=len(named.prompts))
    out["_named_images"] = imgs
    ps, alias_kind = alias_prompts(per_alias)
    pred = classifier.predict(generate(pipe, ps.prompts, ps.seeds, steps, guidance, progress=progress))
    truth = {"object": ps.objects, "style": ps.styles, "colour": ps.colours}
    held = {}
    for kind in ("object", "style", "colour"):
        idx = [i for i, k in enumerate(alias_kind) if k == kind]
        ok = (pred[kind][idx] == torch.tensor([truth[kind][i] for i in idx]))
        held[kind] = float(ok.float().mean())
    out["held_out"] = dict(held, images=len(ps.prompts))
    out["left_out"] = {}
    for kind in ("style", "object", "colour", "all"):
        lp = left_out_prompts(kind, left_out, base_seed=50_000)
        li = generate(pipe, lp.prompts, lp.seeds, steps, guidance, progress=progress)
        judged_kinds = ("style", "object", "colour") if kind == "all" else (kind,)
        out["left_out"][kind] = {k: marginal_shares(classifier, li, k) for k in judged_kinds}
    worst = [(max(sh.values()), kind, k) for kind, d in out["left_out"].items() for k, sh in d.items()]
    out["left_out_worst"] = dict(zip(("share", "prompts_leave_out", "attribute"), max(worst)))
    return out
