"""Prompt following of a ShapesCanvas pipeline, judged by the shipped classifier."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import COLOUR_NAMES, OBJECTS, STYLES, eval_prompt

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 5.0


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
