"""Generate an evaluation image set from a user-provided pipeline: one image per (prompt, seed), resumable.

Images are written as `<name>.png` (prompt sets: the CSV row index, as the Concept Steerers generator
does; UnlearnCanvas: `{style}_{object}_seed{seed}`), and existing files are skipped so an interrupted run
resumes. Interventions (steering, unlearning) are applied by the caller to `pipe` before this runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Sequence


@dataclass
class GenerationConfig:
    steps: int = 50
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None  # "ddim" switches to DDIMScheduler (UnlearnCanvas: DDIM 100, eta 0)
    negative_prompt: str | None = None


@dataclass
class GenItem:
    name: str       # file stem
    prompt: str
    seed: int
    guidance: float


def set_scheduler(pipe, name: str | None) -> None:
    if name is None:
        return
    if name != "ddim":
        raise ValueError(f"unknown scheduler {name!r} (only 'ddim' or the pipeline's default)")
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)


def generate_to_folder(pipe, items: Sequence[GenItem], out_dir: str | Path, cfg: GenerationConfig = GenerationConfig(),
                       ext: str = "png", progress: Callable[[int, int], None] | None = None) -> list[Path]:
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_scheduler(pipe, cfg.scheduler)
    paths = []
    for i, it in enumerate(items):
        path = out / f"{it.name}.{ext}"
        paths.append(path)
        if not path.exists():
            kw = {k: v for k, v in (("height", cfg.height), ("width", cfg.width),
                                    ("negative_prompt", cfg.negative_prompt)) if v is not None}
            with torch.no_grad():
                # CPU generator: same images on any device, as the papers' scripts seed them
                img = pipe(it.prompt, num_inference_steps=cfg.steps, guidance_scale=it.guidance,
                           generator=torch.Generator("cpu").manual_seed(int(it.seed)), **kw).images[0]
            tmp = path.with_name(path.stem + ".tmp." + ext)
            img.save(tmp)
            tmp.replace(path)
        if progress:
            progress(i + 1, len(items))
    return paths


def images_under(pipe, rows, conditions: Sequence[Callable[[], ContextManager]], steps: int, guidance: float):
    """The one loop behind the CLI's image grids: for each prompt row (activations.prompts.PromptRow) and
    each condition (a zero-argument callable returning a context manager, e.g. an intervention opened on
    `pipe`, or contextlib.nullcontext for the plain model), yield (row, condition index, image) with the
    image a [3, H, W] float CPU tensor in [0, 1].

    Every condition of a row uses the row's seed on a CPU generator, so the images of one row differ only
    by the condition; the row's own guidance wins over `guidance`.
    """
    import torch

    from ..interventions.rewind import generate

    for row in rows:
        for j, condition in enumerate(conditions):
            with condition():
                # one generator per image (the same noise as a single one): a rewinding edit can redo the sample
                r = generate(pipe, row.prompt, num_inference_steps=steps, guidance_scale=row.guidance or guidance,
                             generator=[torch.Generator().manual_seed(row.seed)], output_type="pt")
            yield row, j, r.images[0].float().cpu()
