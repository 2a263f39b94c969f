"""`diffusion-sae unlearn`: SAeUron, original and unlearned image side by side per prompt."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer

from .common import (DEVICE_OPT, DTYPE_OPT, OFFLOAD_OPT, SHAPES, check_generation, check_out_file, detector_thresholds,
                     fail, guidance_for, label_grid, load_model, load_sae_arg, parse_window, prompt_set, read_probe,
                     sae_folder)


def unlearn_cmd(model: str = typer.Option(SHAPES), sae: Optional[list[Path]] = typer.Option(None, help="Block SAE folder (default: bundled); repeat it to edit several blocks at once (each folder holds its dictionary)."),
                dictionary: Optional[Path] = typer.Option(None, help="Concept dictionary folder (default: next to the SAE)."),
                dictionary_name: Optional[str] = typer.Option(None, help="Dictionary file stem (ShapesCanvas: concept_dictionary_style|object|colour)."),
                concept: list[str] = typer.Option(..., help="Concept to unlearn (repeatable: several at once)."),
                multiplier: float = typer.Option(-1.0, help="γ: the scale of selected features is γ·μ_c(t) (--scaling mean) or γ (latent)."),
                scaling: str = typer.Option("mean", help="mean: z·γ·μ_c(t) (official); latent: z·γ."),
                selection: str = typer.Option("paper", help="paper: official scores, bar ν; specific: per-patch specificity (ours)."),
                min_fire: int = typer.Option(1, help="Edit a patch only where this many selected features fire together (ours; 1 = the paper)."),
                window: Optional[str] = typer.Option(None, help="Edit only at denoising step indices START <= t < STOP, "
                                                     "given as START-STOP, e.g. 5-25 (ours; default: every step, the paper)."),
                edit: str = typer.Option("scale", help="scale: firing features become z·γ·μ or z·γ (the paper); replace: "
                                         "they become the other concepts' mean at the step, γ ignored (ours); replace_patch: "
                                         "the firing patch becomes that code's reconstruction, SAE error dropped (ours); "
                                         "mean_patch: the firing patch becomes the other concepts' mean patch (ours)."),
                exclusive: bool = typer.Option(False, help="Several concepts: on each patch apply only the concept with the most firing features (ours; the paper applies every one)."),
                percentile: Optional[float] = None, top_n: Optional[int] = typer.Option(None, help="Features per step (default 1 if no percentile)."),
                faithful: bool = typer.Option(False, help="The official (sign-flipped) error term."),
                add: bool = typer.Option(False, "--add", help="Amplify the concept instead (multiplier = α)."),
                detector: Optional[list[Path]] = typer.Option(None, help="The folder of a saved concept probe (`concepts "
                                                              "probe`, fitted on every --concept): each concept's "
                                                              "edits act only on the samples the probe flags as "
                                                              "heading to it, from the step after the probe's (ours; "
                                                              "not with --faithful or --add). Repeatable: a sample any "
                                                              "of them flags is edited, from the step after that "
                                                              "probe's (e.g. a --branch cond probe at step 0 and an "
                                                              "image-side one later)."),
                detector_threshold: Optional[list[str]] = typer.Option(None, help="With --detector: the probe "
                                                                       "probability from which a sample is flagged "
                                                                       "(default 0.5); once for every --detector, or "
                                                                       "once per --detector in their order."),
                rewind: bool = typer.Option(False, help="With --detector: a sample a probe flagged after the edits' "
                                            "first step is denoised again from its first latent with the edits from "
                                            "their first step (ours; a second pass over those samples)."),
                prompt: Optional[list[str]] = typer.Option(None), prompts: Optional[Path] = None,
                steps: int = 25, guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance (default: the bundled model's 2, else 7.5)."), seed: int = 0,
                out: Optional[Path] = typer.Option(None, help="Grid PNG: original | unlearned per prompt (default "
                                                   "unlearn.png unless --save-images is given)."),
                save_images: Optional[Path] = typer.Option(None, help="Also save every image: DIR/original/<row>.png and "
                                                           "DIR/unlearned/<row>.png (one per prompt and seed) with "
                                                           "DIR/index.csv; resumable (the layout `eval nudity --images` reads)."),
                device: str = DEVICE_OPT, dtype: str = DTYPE_OPT, offload: str = OFFLOAD_OPT):
    """SAeUron: generate with concepts unlearned by scaling their per-step SAE features (with --detector: only on
    the samples a concept probe flags, from the step after its own)."""
    from ..concepts.dictionary import ConceptDictionary, DictionaryError
    from ..eval.generate import images_under
    from ..interventions.ablate import EDITS, ConceptEdit, StepGridError, unlearn_concepts
    from ..models import resolve_hookpoint
    from ..world import bundle

    guidance = guidance_for(model, guidance)
    check_generation(steps, guidance, multiplier=multiplier)
    if top_n is not None and top_n <= 0:
        fail(f"--top-n must be a positive number of features per step, got {top_n}")
    if percentile is not None and not 0 < percentile < 100:
        fail(f"--percentile must lie strictly between 0 and 100, got {percentile}")
    if top_n is not None and percentile is not None:
        fail("give either --top-n or --percentile, not both")
    if edit not in EDITS:
        fail(f"--edit must be {', '.join(EDITS[:-1])} or {EDITS[-1]}, not {edit!r}")
    if edit != "scale" and (add or faithful):
        fail(f"--edit {edit} removes features (ours): drop {'--add' if add else '--faithful'}")
    win = parse_window(window) if window is not None else None
    if win is not None and win[0] >= steps:
        fail(f"--window {window}: starts past the last of the {steps} steps, so nothing would be edited")
    probes = _detector_probes(detector, detector_threshold, list(concept), steps, faithful, add)
    if rewind and not detector:
        fail("--rewind redoes the samples a --detector flagged late: give --detector")
    if out is not None or save_images is None:
        out = out or Path("unlearn.png")
        check_out_file(out)
    if save_images is not None:
        from ..eval.imageset import check_image_folder

        check_image_folder(save_images)

    pipe = load_model(model, device, dtype, offload)
    if scaling not in ("mean", "latent"):
        fail(f"--scaling must be mean or latent, not {scaling!r}")
    if selection not in ("paper", "specific"):
        fail(f"--selection must be paper or specific, not {selection!r}")
    if sae and len(sae) > 1 and dictionary is not None:
        fail("--dictionary names one folder: with several --sae, keep each dictionary next to its SAE")
    saes = [load_sae_arg(f, None, bundle.load_block_sae, pipe) for f in (sae or [None])]
    try:
        if dictionary is None and not sae:
            kinds = [k for k, names in bundle.KINDS.items() if concept[0] in names]
            dicts = [bundle.load_dictionary(dictionary_name or (kinds[0] if kinds else "style"))]
        else:
            dicts = [ConceptDictionary.load(dictionary or sae_folder(f), name=dictionary_name or "concept_dictionary")
                     for f in (sae or [None])]  # --dictionary alone: with the bundled SAE
    except DictionaryError as e:
        fail(str(e))
    ps = prompt_set(prompts, prompt, seed)
    if top_n is None and percentile is None:
        top_n = 1
    if top_n is not None and top_n > min(s.cfg.num_latents for s in saes):
        fail(f"--top-n must lie in 1..{min(s.cfg.num_latents for s in saes)} (the SAE's latents), got {top_n}")
    for path, (probe, _) in zip(detector or [], probes):   # before any image: the probe's block is in this model
        try:
            if resolve_hookpoint(pipe, probe.hookpoint).kind != "denoiser":
                fail(f"--detector {path}: its block {probe.hookpoint!r} is not a denoiser block; refit the probe "
                     "at a denoiser block (concepts probe --hookpoint)")
        except ValueError as e:
            fail(f"--detector {path}: {str(e).splitlines()[0]}")
    edits: list = list(concept)
    if probes:   # each concept gated by every probe's verdict for it (any of them flags)
        gates = {c: tuple(probe.detector(c, p) for probe, p in probes) for c in concept}
        try:
            edits = [ConceptEdit(c, multiplier, percentile, top_n if percentile is None else None, scaling, selection,
                                 min_fire, exclusive, win, edit, detector=gates[c] if len(probes) > 1 else gates[c][0],
                                 rewind=rewind)
                     for c in concept]
        except DictionaryError as e:
            fail(str(e).splitlines()[0])
    conditions = [contextlib.nullcontext,
                  lambda: unlearn_concepts(pipe, saes, dicts, edits, multiplier=multiplier,
                                           percentile=percentile, top_n=top_n, faithful=faithful,
                                           mode="add" if add else "ablate", scaling=scaling, selection=selection,
                                           min_fire=min_fire, exclusive=exclusive, window=win, edit=edit)]
    try:
        if save_images is not None:
            imgs = _save_image_set(pipe, ps, save_images, conditions, steps, guidance, out is not None, model=model,
                                   sae=[str(f) for f in sae] if sae else "bundled", dictionary=dictionary,
                                   dictionary_name=dictionary_name, concepts=list(concept), multiplier=multiplier,
                                   percentile=percentile, top_n=top_n, faithful=faithful, add=add, scaling=scaling,
                                   selection=selection, min_fire=min_fire, exclusive=exclusive,
                                   **({"window": list(win)} if win is not None else {}),  # unset: old folders resume
                                   **({"edit": edit} if edit != "scale" else {}),
                                   **({"detector": [str(d) for d in detector or []],
                                       "detector_threshold": [p for _, p in probes]} if probes else {}),
                                   **({"rewind": True} if rewind else {}))
        else:
            imgs = [img for _, _, img in images_under(pipe, ps.rows, conditions, steps, guidance)]
    except (DictionaryError, StepGridError, ValueError) as e:
        fail(str(e).splitlines()[0])
    label = ("added " if add else "unlearned ") + ", ".join(concept)
    if out is not None:
        label_grid(imgs, [r.prompt for r in ps.rows], ["original", label], out)
        typer.echo(f"grid ({len(ps)} prompts): {out}")


def _detector_probes(detector, detector_threshold, concepts: list[str], steps: int, faithful: bool,
                     add: bool) -> list[tuple]:
    """--detector / --detector-threshold: (probe, threshold) per --detector, checked before the model loads: each
    probe is fitted on every --concept and reads a step before the last one."""
    thresholds = detector_thresholds(detector, detector_threshold)
    if detector_threshold and not detector:
        fail("--detector-threshold only acts with --detector (the folder of a saved concept probe)")
    if detector and (faithful or add):
        fail(f"--detector gates our ablation (each flagged sample's edits from the step after the probe's): drop "
             f"{'--add' if add else '--faithful'}, which edits every sample")
    out = []
    for path, threshold in zip(detector or [], thresholds):
        probe = read_probe(path)
        if probe.step >= steps - 1:
            fail(f"--detector {path} reads step {probe.step}: of --steps {steps} none is left after it to edit; "
                 "give a probe of an earlier step or more --steps")
        missing = [c for c in concepts if c not in probe.concepts]
        if missing:
            fail(f"--detector {path}: the probe was fitted on {', '.join(probe.concepts)}, not on --concept "
                 f"{missing[0]!r}; give a probe fitted on every --concept")
        out.append((probe, threshold))
    return out


def _save_image_set(pipe, ps, folder: Path, conditions, steps: int, guidance: float, grid: bool, model, **settings):
    """--save-images: the original and unlearned image of every prompt row into `folder` (eval/imageset.py,
    resumable, with an index); returns the images for the grid ([3, H, W] in [0, 1], row by row) when asked."""
    import numpy as np
    import torch
    from PIL import Image

    from ..eval.imageset import Condition, ImageItem, generate_image_set

    edited = "added" if settings["add"] else "unlearned"
    items = [ImageItem(str(i), r.prompt, r.seed, r.guidance or guidance) for i, r in enumerate(ps.rows)]
    res = generate_image_set(pipe, items, folder, [Condition("original", conditions[0]),
                                                   Condition(edited, conditions[1], settings)],
                             steps, settings={"model": str(model)})
    typer.echo(f"saved {len(items)} x 2 images to {folder}/original|{edited}/<row>.png ({res['generated']} new), "
               f"index {folder}/index.csv")
    if not grid:
        return []
    imgs = []
    for a, b in zip(res["files"]["original"], res["files"][edited]):
        for f in (a, b):
            with Image.open(f) as im:
                imgs.append(torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1))
    return imgs

