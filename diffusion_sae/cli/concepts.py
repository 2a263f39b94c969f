"""`diffusion-sae concepts build`: SAeUron concept dictionaries; `concepts probe`: concept probes (the per-sample
detector of steer's family gate and of unlearn, --detector)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import (DEVICE_OPT, DTYPE_OPT, OFFLOAD_OPT, SHAPES, check_generation, fail, guidance_for, inside_package,
                     load_model, load_sae_arg, progress_bar)


concepts_app = typer.Typer(no_args_is_help=True, help="Concept dictionaries (which SAE features are which concept) "
                           "and concept probes (which concept a sample is heading to).")


@concepts_app.command("build")
def concepts_build(model: str = typer.Option(SHAPES), sae: Optional[Path] = typer.Option(None, help="SAE folder (default: the bundled block SAE)."),
                   hookpoint: Optional[str] = typer.Option(None, help="Denoiser block (default: the SAE's)."),
                   concepts: Optional[Path] = typer.Option(None, help="JSON file mapping each concept to a list of its prompts."),
                   shapes: Optional[str] = typer.Option(None, help="ShapesCanvas concept kind: style, object or colour."),
                   per_concept: int = 20, steps: int = 25, guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance (default: the bundled model's 2, else 7.5)."), seed: int = 0,
                   out: Optional[Path] = typer.Option(None, help="Folder (default: next to --sae; required with the bundled SAE)."),
                   name: Optional[str] = typer.Option(None, help="File stem (default concept_dictionary[_kind])."),
                   device: str = DEVICE_OPT, dtype: str = DTYPE_OPT, offload: str = OFFLOAD_OPT):
    """Build a SAeUron concept dictionary: per-concept, per-step mean SAE latents at a block."""
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
    groups = _prompt_groups(concepts, "--concepts") if concepts is not None else None

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


@concepts_app.command("probe")
def concepts_probe(model: str = typer.Option(SHAPES),
                   hookpoint: Optional[str] = typer.Option(None, help="Denoiser block the probe reads (default for the "
                                                           "bundled model: the block of --kind's shipped probes)."),
                   step: Optional[int] = typer.Option(None, help="The denoising step it reads (0 = the first, noisiest; "
                                                      "required)."),
                   prompts: Optional[Path] = typer.Option(None, help="JSON file mapping each concept to a list of prompts naming it."),
                   kind: Optional[str] = typer.Option(None, help="ShapesCanvas concept kind: style, object or colour "
                                                      "(the bundled prompts naming each concept; instead of --prompts)."),
                   per_concept: int = typer.Option(32, help="With --kind: prompts per concept."),
                   seed_start: int = typer.Option(500, help="Seed of the first prompt; one seed per prompt from it "
                                                  "(default 500: the bundled benchmark's tuning seeds)."),
                   steps: int = 25, guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance (default: the bundled model's 2, else 7.5)."),
                   out: Optional[Path] = typer.Option(None, help="Folder for concept_probe.json / .safetensors (required)."),
                   branch: str = typer.Option("uncond", help="Guidance branch the probe reads: uncond (default: the "
                                              "image side, what the noisy sample alone carries, so it also flags "
                                              "samples of prompts that never name the concept; best a few steps in) "
                                              "or cond (the prompt's branch: what the prompt asks for in the model's "
                                              "own reading, paraphrased or adversarial prompts included, already "
                                              "at --step 0, before the image has decided)."),
                   device: str = DEVICE_OPT, dtype: str = DTYPE_OPT, offload: str = OFFLOAD_OPT):
    """Fit a concept probe: which concept a sample is heading to, read from a denoiser block mid-generation
    (the detector of steer's family gate and of unlearn, --detector)."""
    from ..concepts.dictionary import check_output_folder
    from ..concepts.probe import BRANCHES, ProbeError, fit_concept_probe
    from ..models import HookpointError
    from ..world import bundle

    # Every option is checked before the model loads and the prompts run.
    if out is None:
        fail("give --out FOLDER for the new probe (then pass it to steer or unlearn --detector FOLDER)")
    if inside_package(out):
        fail(f"--out {out}: inside the installed diffusion_sae package, whose files are never overwritten; "
             "give a folder of your own")
    check_output_folder(out)
    if branch not in BRANCHES:
        fail(f"--branch must be {' or '.join(BRANCHES)} (the guidance branch the probe reads), not {branch!r}")
    if (prompts is None) == (kind is None):
        fail("give exactly one of --prompts FILE.json or --kind style|object|colour")
    if kind is not None and kind not in bundle.KINDS:
        fail(f"--kind must be one of {', '.join(bundle.KINDS)}, not {kind!r}")
    if per_concept <= 0:
        fail(f"--per-concept must be a positive number of prompts, got {per_concept}")
    guidance = guidance_for(model, guidance)
    check_generation(steps, guidance)
    if step is None:
        fail("give --step N: the denoising step the probe reads (0 = the first; steer --detector needs it below "
             "--implicit-from-step)")
    if not 0 <= step < steps:
        fail(f"--step {step} is not one of the sampler's {steps} steps (0..{steps - 1})")
    if seed_start < 0:
        fail(f"--seed-start must be a seed >= 0, got {seed_start}")
    if hookpoint is None and model not in (None, "", SHAPES):
        fail("give --hookpoint: the denoiser block the probe reads, e.g. unet.up_blocks.1.attentions.0")
    if prompts is not None:
        groups = _prompt_groups(prompts, "--prompts")
        if len(groups) < 2 or any(not c.strip() for c in groups):
            fail(f"--prompts {prompts}: a probe needs at least two concepts, each named (a non-empty key) with "
                 "prompts naming it")
    else:
        groups = bundle.concept_prompts(str(kind), per_concept)
    hp = hookpoint or (bundle.PROBE_HOOKPOINTS[kind] if kind else bundle.BLOCK_HOOKPOINT)

    pipe = load_model(model, device, dtype, offload)
    n = sum(len(v) for v in groups.values())
    seeds = list(range(seed_start, seed_start + n))
    try:
        probe = fit_concept_probe(pipe, hp, groups, step, seeds=seeds, steps=steps, guidance=guidance, branch=branch)
        path = probe.save_pretrained(out)
    except HookpointError as e:
        fail(f"--hookpoint: {str(e).splitlines()[0]}")
    except ProbeError as e:
        fail(str(e).splitlines()[0])
    typer.echo(f"probe of {len(probe.concepts)} concepts at {probe.hookpoint} ({probe.branch} branch), step "
               f"{probe.step} of {steps}, fitted on {n} prompts: training accuracy "
               f"{probe.meta['train_accuracy']:.3f} -> {path.parent}")


def _prompt_groups(path: Path, option: str) -> dict:
    """A JSON file {concept: [prompt, ...]} with at least one non-empty prompt per concept."""
    import json as _json

    try:
        groups = _json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        fail(f"{option} {path}: not UTF-8 text; save it as UTF-8 JSON {{concept: [prompts]}}")
    except OSError as e:
        fail(f"{option} {path}: {e.strerror or e}; give a JSON file {{concept: [prompts]}}")
    except ValueError as e:
        fail(f"{option} {path}: not valid JSON ({e}); expected {{concept: [prompts]}}")
    if not isinstance(groups, dict) or not groups or any(
            not isinstance(v, list) or not v or not all(isinstance(x, str) and x.strip() for x in v)
            for v in groups.values()):
        fail(f"{option} {path}: expected a JSON object {{concept: [prompt, ...]}} with at least one "
             "non-empty prompt per concept")
    return groups
