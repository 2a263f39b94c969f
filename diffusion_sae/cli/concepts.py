"""`diffusion-sae concepts build`: SAeUron concept dictionaries."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import DEVICE_OPT, DTYPE_OPT, OFFLOAD_OPT, SHAPES, fail, guidance_for, load_model, load_sae_arg, progress_bar


concepts_app = typer.Typer(no_args_is_help=True, help="Concept dictionaries: which SAE features are which concept.")


@concepts_app.command("build")
def concepts_build(model: str = typer.Option(SHAPES), sae: Optional[Path] = typer.Option(None, help="SAE folder (default: the bundled block SAE)."),
                   hookpoint: Optional[str] = typer.Option(None, help="Denoiser block (default: the SAE's)."),
                   concepts: Optional[Path] = typer.Option(None, help="JSON {concept: [prompts]}."),
                   shapes: Optional[str] = typer.Option(None, help="ShapesCanvas concept kind: style, object or colour."),
                   per_concept: int = 20, steps: int = 25, guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance (default: the bundled model's 2, else 7.5)."), seed: int = 0,
                   out: Optional[Path] = typer.Option(None, help="Folder (default: next to --sae; required with the bundled SAE)."),
                   name: Optional[str] = typer.Option(None, help="File stem (default concept_dictionary[_kind])."),
                   device: str = DEVICE_OPT, dtype: str = DTYPE_OPT, offload: str = OFFLOAD_OPT):
    """Build a SAeUron concept dictionary: per-concept, per-step mean SAE latents at a block."""
    import json as _json

    import math as _math

    from ..concepts.dictionary import DictionaryError, build_concept_dictionary, check_output_folder
    from ..world import bundle

    # Every option is checked before the model loads and the prompts run.
    if (concepts is None) == (shapes is None):
        fail("give exactly one of --concepts FILE.json or --shapes style|object|colour")
    if shapes is not None and shapes not in bundle.KINDS:
        fail(f"--shapes must be one of {', '.join(bundle.KINDS)}, not {shapes!r}")
    if per_concept <= 0:
        fail(f"--per-concept must be a positive number of prompts, got {per_concept}")
    if steps <= 0:
        fail(f"--steps must be a positive number of denoising steps, got {steps}")
    guidance = guidance_for(model, guidance)
    if not _math.isfinite(guidance):
        fail(f"--guidance must be a finite number, got {guidance}")
    if name is not None and (not name or Path(name).name != name or name.startswith(".")):
        fail(f"--name {name!r}: give a plain file stem such as concept_dictionary")
    folder = out or sae
    if folder is None:
        fail("give --out FOLDER for the new dictionary (the bundled one inside the package is never "
             "overwritten); then pass --dictionary FOLDER to unlearn")
    check_output_folder(folder, "--out" if out else "--sae (the default --out)")
    groups = None
    if concepts is not None:
        try:
            groups = _json.loads(concepts.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            fail(f"--concepts {concepts}: not UTF-8 text; save it as UTF-8 JSON {{concept: [prompts]}}")
        except OSError as e:
            fail(f"--concepts {concepts}: {e.strerror or e}; give a JSON file {{concept: [prompts]}}")
        except ValueError as e:
            fail(f"--concepts {concepts}: not valid JSON ({e}); expected {{concept: [prompts]}}")
        if not isinstance(groups, dict) or not groups or any(
                not isinstance(v, list) or not v or not all(isinstance(x, str) and x.strip() for x in v)
                for v in groups.values()):
            fail(f"--concepts {concepts}: expected a JSON object {{concept: [prompt, ...]}} with at least one "
                 "non-empty prompt per concept")

    pipe = load_model(model, device, dtype, offload)
    sae_obj = load_sae_arg(sae, None, bundle.load_block_sae, pipe)
    hookpoint = hookpoint or sae_obj.cfg.hookpoint or bundle.BLOCK_HOOKPOINT
    if groups is None:
        groups = bundle.concept_prompts(shapes, per_concept, seed)
    seeds = list(range(seed, seed + max(len(v) for v in groups.values())))
    try:
        with progress_bar() as p:
            task = p.add_task("dictionary", total=sum(len(v) for v in groups.values()), info="")
            d = build_concept_dictionary(pipe, sae_obj, hookpoint, groups, seeds=seeds, steps=steps, guidance=guidance,
                                         progress=lambda i, n: p.update(task, completed=i))
    except DictionaryError as e:
        fail(str(e))
    stem = name or (bundle.dictionary_name(shapes) if shapes else "concept_dictionary")
    path = d.save(folder, name=stem)
    typer.echo(f"{len(d.concepts)} concepts x {len(d.timesteps)} steps x {d.means.shape[-1]} latents -> {path}")

