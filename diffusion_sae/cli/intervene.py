"""`diffusion-sae intervene`: any registered intervention (interventions/registry.py) by name, original and
edited image side by side per prompt. A new intervention registers itself and is usable here unchanged."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer

from .common import (DEVICE_OPT, DTYPE_OPT, METHOD_HELP, METHOD_SAE_HELP, OFFLOAD_OPT, SET_HELP, SHAPES,
                     check_generation, check_out_file, fail, guidance_for, label_grid, load_model, method_config,
                     method_context, method_intervention, progress_bar, prompt_set)


def intervene_cmd(method: Optional[str] = typer.Option(None, "--method", help=METHOD_HELP),
                  set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
                  list_methods: bool = typer.Option(False, "--list", help="Print the registered interventions "
                                                    "and their settings, and exit."),
                  model: str = typer.Option(SHAPES, help="Pipeline folder, hub id, tiny:<family> or shapescanvas."),
                  sae: Optional[Path] = typer.Option(None, help=METHOD_SAE_HELP),
                  prompt: Optional[list[str]] = typer.Option(None, help="Prompt (repeatable)."),
                  prompts: Optional[Path] = typer.Option(None, help="Prompt file with per-row seeds."),
                  steps: int = 25, guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance "
                                                                           "(default: the bundled model's 2, else 7.5)."),
                  seed: int = 0,
                  out: Path = typer.Option(Path("intervene.png"), help="Grid: original | edited per prompt."),
                  device: str = DEVICE_OPT, dtype: str = DTYPE_OPT, offload: str = OFFLOAD_OPT):
    """Generate with a registered intervention (--method NAME --set key=value ...) beside the plain model."""
    from ..eval.generate import images_under
    from ..interventions.registry import get_intervention, intervention_names

    if list_methods:
        for name in intervention_names():
            spec = get_intervention(name)
            typer.echo(f"{name} ({spec.sae} SAE): {spec.summary}\n    settings: {spec.settings_help()}")
        return
    if method is None:
        fail("give --method NAME (see --list)")
    spec, config = method_config(method, set_)
    guidance = guidance_for(model, guidance)
    check_generation(steps, guidance)
    prompt_set(prompts, prompt, seed)   # a bad prompt file fails before the model loads
    check_out_file(out)
    pipe = load_model(model, device, dtype, offload)
    iv = method_intervention(spec, config, sae, pipe, model)
    ps = prompt_set(prompts, prompt, seed)
    imgs = []
    with progress_bar() as p:
        task = p.add_task(method, total=2 * len(ps), info="")
        for _, _, img in images_under(pipe, ps.rows, [contextlib.nullcontext, method_context(pipe, iv)], steps,
                                      guidance):
            imgs.append(img)
            p.advance(task)
    label_grid(imgs, [r.prompt for r in ps.rows], ["original", method], out)
    for i, r in enumerate(ps.rows):
        # what the intervention did, as a number: mean absolute pixel change (0..255)
        diff = float((imgs[2 * i + 1] - imgs[2 * i]).abs().mean()) * 255
        typer.echo(f"{r.prompt!r} seed {r.seed}: mean |edited - original| {diff:.2f} / 255")
    typer.echo(f"grid ({len(ps)} prompts, {iv.name}): {out}")
