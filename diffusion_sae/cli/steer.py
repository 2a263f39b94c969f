"""`diffusion-sae steer`: Concept Steerers over a grid of prompts x strengths."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from .common import (DEVICE_OPT, DTYPE_OPT, OFFLOAD_OPT, SHAPES, check_generation, check_out_file,
                     check_writable_parent, detector_thresholds, fail, guidance_for, label_grid, load_model,
                     load_sae_arg, parse_number, parse_strengths, progress_bar, prompt_lines, prompt_set, read_probe,
                     save_image)


def steer_cmd(model: str = typer.Option(SHAPES), sae: Optional[Path] = typer.Option(None, help="Text SAE folder (default: bundled)."),
              hookpoint: Optional[str] = typer.Option(None, help="Text-encoder layer (default: the SAE's)."),
              concept: Optional[list[str]] = typer.Option(None, help="Concept prompt (repeatable; each gets the same strength)."),
              strength: Optional[str] = typer.Option(None, help="One strength λ (λ<0 removes, λ>0 adds)."),
              strengths: str = typer.Option("-1,-0.5,0,0.5", help="Strengths for the grid's columns."),
              prompt: Optional[list[str]] = typer.Option(None, help="Prompt (repeatable)."),
              prompts: Optional[Path] = typer.Option(None, help="Prompt file with per-row seeds."),
              steps: int = 25, guidance: Optional[float] = typer.Option(None, help="Classifier-free guidance (default: the bundled model's 2, else 7.5)."), seed: int = 0, no_negative_steering: bool = False,
              gate: Optional[str] = typer.Option(None, help="Steer only prompts containing this text's tokens (e.g. 'striped'); "
                                                 "default: every prompt, as the paper does."),
              baseline: Optional[str] = typer.Option(None, help="Subtract this prompt's matrix (e.g. '') from S."),
              concept_file: Optional[Path] = typer.Option(None, help="Example prompts naming the concept, one per line: their "
                                                          "matrices are averaged into one concept (instead of --concept)."),
              baseline_file: Optional[Path] = typer.Option(None, help="The same prompts without the concept, one per line: their "
                                                           "mean is subtracted (contrastive pairs, ours; instead of --baseline)."),
              keep: Optional[list[str]] = typer.Option(None, help="Concept to leave alone (repeatable, e.g. --keep circle "
                                                       "--keep 'striped style'): S is made orthogonal to its rows (ours)."),
              rival: Optional[list[str]] = typer.Option(None, help="A rival of the concept (repeatable, e.g. --rival dog "
                                                        "--rival horse): turns on the family gate (ours): S acts fully "
                                                        "where the concept is named, not where only a rival is."),
              concept_word: Optional[list[str]] = typer.Option(None, help="A word that names the concept for the family "
                                                               "gate (repeatable; needed with --rival)."),
              implicit: Optional[str] = typer.Option(None, help="Family gate: the scale of S on prompts naming none of "
                                                     "the family (default 0: leave them as they are; 1: the paper)."),
              implicit_negative: Optional[str] = typer.Option(None, help="Family gate: the same on those prompts' "
                                                              "negative branch (default: as --implicit)."),
              implicit_from_step: Optional[str] = typer.Option(None, help="Family gate: the implicit scale acts "
                                                               "only from this denoising step on (default 0: every step; "
                                                               "before it those prompts are generated unsteered)."),
              match: Optional[str] = typer.Option(None, help="Family gate: how a name is found in a prompt: embedding "
                                                  "(nearest word in the text encoder's token embeddings: follows "
                                                  "learned synonyms; default) or tokens (exact words: a prompt filter)."),
              detector: Optional[list[Path]] = typer.Option(None, help="Family gate: the folder of a saved concept "
                                                            "probe (`concepts probe`); from --implicit-from-step on, "
                                                            "the implicit scale acts only on the samples it flags as "
                                                            "heading to the concept (one of --concept-word). Repeatable: "
                                                            "a sample any of the probes flags is flagged (e.g. a "
                                                            "--branch cond probe at step 0 and an image-side one later)."),
              detector_threshold: Optional[list[str]] = typer.Option(None, help="With --detector: the probe "
                                                                     "probability from which a sample is flagged "
                                                                     "(default 0.5); once for every --detector, or "
                                                                     "once per --detector in their order."),
              named_late: Optional[str] = typer.Option(None, help="With --detector: from --implicit-from-step on, "
                                                       "scale S by this factor (> 0) on prompts naming the concept, "
                                                       "on the samples the probe flags (e.g. 4 escalates the removal "
                                                       "where the image still heads to the concept; default 1: S "
                                                       "unchanged)."),
              rival_late: Optional[str] = typer.Option(None, help="With --detector: from --implicit-from-step on, "
                                                       "scale S by this factor (>= 0) on prompts the gate reads as "
                                                       "naming a --rival, on the samples the probe flags (for a name of "
                                                       "the concept the matcher misreads; default 0: such prompts are "
                                                       "never steered)."),
              rewind: bool = typer.Option(False, help="With --detector: denoise every sample a probe flagged again "
                                          "from its first latent with the implicit scale from the first step (a "
                                          "second pass over the flagged samples; the others stay as generated)."),
              ablate_features: Optional[int] = typer.Option(None, help="Also take the concept's N text-SAE features out at "
                                                            "every position of every prompt (ours: the SAE's reading "
                                                            "follows the concept to any position and synonym; N features "
                                                            "most active on the concept above --baseline / the empty "
                                                            "prompt). Removal only (λ < 0)."),
              ablate_ceiling: Optional[str] = typer.Option(None, help="With --ablate-features: keep each feature up to "
                                                           "this quantile (e.g. 0.99) of its activation on the baseline "
                                                           "prompts; only the excess is taken out (default: all of it)."),
              save_images: Optional[Path] = typer.Option(None, help="Also save each image as DIR/<row>.png (one strength only; "
                                                         "the layout `eval nudity --images` reads)."),
              out: Optional[Path] = typer.Option(None, help="Image grid PNG (rows: prompts, columns: strengths); "
                                                 "default steer.png unless --save-images is given."),
              device: str = DEVICE_OPT, dtype: str = DTYPE_OPT, offload: str = OFFLOAD_OPT):
    """Concept Steerers: generate with a concept removed (λ<0) or added (λ>0) over a strength grid."""
    from ..eval.generate import images_under
    from ..interventions.steer import (SteeringError, concept_feature_ablation, concept_steering, family_gate,
                                       steer_text_encoder)
    from ..world import bundle

    if strength is not None:
        try:
            lams = [float(strength)]
        except ValueError:
            fail(f"--strength must be a number, got {strength!r}")
        if not math.isfinite(lams[0]):
            fail(f"--strength must be a finite number, got {strength!r}")
    else:
        lams = parse_strengths(strengths)
    if not concept and concept_file is None:
        fail("no concept: give --concept 'striped' (repeatable) or --concept-file with example prompts")
    if concept and concept_file is not None:
        fail("give either --concept or --concept-file, not both")
    if baseline is not None and baseline_file is not None:
        fail("give either --baseline or --baseline-file, not both")
    family = _family_options(rival, concept_word, implicit, implicit_negative, match, gate, implicit_from_step, steps,
                             detector, detector_threshold, named_late, rewind, rival_late)
    ceiling = None
    if ablate_ceiling is not None:
        ceiling = parse_number(ablate_ceiling, "--ablate-ceiling")
        if not 0.0 <= ceiling <= 1.0:
            fail(f"--ablate-ceiling must be a quantile in [0, 1] (e.g. 0.99), got {ablate_ceiling!r}")
        if ablate_features is None:
            fail("--ablate-ceiling only acts with --ablate-features: give both or leave it out")
    if ablate_features is not None:
        if ablate_features < 1:
            fail(f"--ablate-features must be a number of SAE features >= 1 (e.g. 16), got {ablate_features}")
        if any(lam > 0 for lam in lams):
            fail("--ablate-features removes a concept: use it with strengths <= 0")
    concepts = {c: c for c in concept or []}
    if concept_file is not None:
        concepts = {concept_file.name: prompt_lines(concept_file, "--concept-file")}
    base_prompts = prompt_lines(baseline_file, "--baseline-file") if baseline_file is not None else baseline
    # Before the model loads and any image is made: the outputs must be writable files of a known type.
    guidance = guidance_for(model, guidance)
    check_generation(steps, guidance)
    prompt_set(prompts, prompt, seed)  # (read again below) a bad prompt file fails before the model loads
    if save_images is not None and len(lams) != 1:
        fail("--save-images needs a single --strength")
    if out is not None or save_images is None:
        check_out_file(out or Path("steer.png"))
    if save_images is not None:
        if save_images.exists() and not save_images.is_dir():
            fail(f"--save-images {save_images} is a file; give a folder")
        check_writable_parent(save_images / "0.png", "--save-images")
    pipe = load_model(model, device, dtype, offload)
    sae_obj = load_sae_arg(sae, hookpoint, bundle.load_text_sae, pipe)
    hp = hookpoint or sae_obj.cfg.hookpoint or bundle.TEXT_HOOKPOINT
    ps = prompt_set(prompts, prompt, seed)
    if save_images is None and out is None:
        out = Path("steer.png")
    imgs = []
    try:
        base = {c: concept_steering(sae_obj, pipe, hp, text, 1.0, baseline=base_prompts, gate=gate, keep=keep or None)
                for c, text in concepts.items()}
        if ablate_features is not None:
            contrast = ([base_prompts] if isinstance(base_prompts, str) else list(base_prompts)) if base_prompts else [""]
            for text, s in zip(concepts.values(), base.values()):
                s.ablation = concept_feature_ablation(sae_obj, pipe, hp, [text] if isinstance(text, str) else list(text),
                                                      contrast, ablate_features, ceiling_quantile=ceiling)
        if family is not None:
            rows = family_gate(pipe, hp, **family)
            for s in base.values():
                s.rows = rows
        conditions = [lambda lam=lam: steer_text_encoder(pipe, [s.scaled(lam) for s in base.values()],
                                                         negative_steering=not no_negative_steering)
                      for lam in lams]
        with progress_bar() as p:
            task = p.add_task("steer", total=len(ps) * len(lams), info="")
            for _, _, img in images_under(pipe, ps.rows, conditions, steps, guidance):
                if save_images is not None:
                    save_image(img, save_images / f"{len(imgs)}.png")
                imgs.append(img if out is not None else None)   # a counter only when no grid is drawn
                p.advance(task)
    except (SteeringError, ValueError) as e:
        fail(str(e).splitlines()[0])
    if out is not None:
        label_grid(imgs, [r.prompt for r in ps.rows], [f"λ={lam:g}" for lam in lams], out)
        typer.echo(f"grid ({len(ps)} prompts x {len(lams)} strengths, concept {', '.join(concepts)!r}): {out}")
    if save_images is not None:
        typer.echo(f"saved {len(ps)} images to {save_images}/<row>.png")


def _family_options(rival, concept_word, implicit, implicit_negative, match, gate, implicit_from_step=None,
                    steps=None, detector=None, detector_threshold=None, named_late=None, rewind=False,
                    rival_late=None) -> dict | None:
    """The family gate's arguments (steer.family_gate) from --rival and its companions, checked before the model
    loads (a --detector probe is read here too); None without --rival."""
    if match is not None and match not in ("tokens", "embedding"):
        fail(f"--match must be tokens or embedding, not {match!r}")
    imp = parse_number(implicit, "--implicit") if implicit is not None else 0.0
    imp_neg = parse_number(implicit_negative, "--implicit-negative") if implicit_negative is not None else None
    from_step = 0
    if implicit_from_step is not None:
        if not (implicit_from_step.strip().isascii() and implicit_from_step.strip().isdigit()):
            fail(f"--implicit-from-step must be a denoising step (a whole number >= 0), got {implicit_from_step!r}")
        from_step = int(implicit_from_step)
    thresholds = detector_thresholds(detector, detector_threshold)
    late = 1.0
    if named_late is not None:
        late = parse_number(named_late, "--named-late")
        if not late > 0.0:
            fail(f"--named-late must be a factor > 0 on S (e.g. 4 escalates the removal), got {named_late!r}")
    rival_scale = 0.0
    if rival_late is not None:
        rival_scale = parse_number(rival_late, "--rival-late")
        if not rival_scale >= 0.0:
            fail(f"--rival-late must be a factor >= 0 on S (e.g. 2), got {rival_late!r}")
    words = {"--rival": list(rival or []), "--concept-word": list(concept_word or [])}
    for opt, ws in words.items():
        if any(not w.strip() for w in ws):
            fail(f"{opt} is empty: give a word such as 'dog'")
    if not words["--rival"]:
        given = [opt for opt, v in (("--concept-word", concept_word), ("--implicit", implicit),
                                    ("--implicit-negative", implicit_negative),
                                    ("--implicit-from-step", implicit_from_step), ("--match", match),
                                    ("--detector", detector), ("--detector-threshold", detector_threshold),
                                    ("--named-late", named_late), ("--rival-late", rival_late),
                                    ("--rewind", rewind)) if v]
        if given:
            fail(f"{given[0]} only acts with --rival (the family gate): name the concept's rivals, e.g. --rival dog")
        return None
    if gate is not None:
        fail("--gate and --rival are exclusive: the family gate already steers only the prompts naming the concept")
    if not words["--concept-word"]:
        fail("--rival needs --concept-word: the word(s) that name the concept, e.g. --concept-word cat")
    if steps is not None and from_step >= steps > 0:
        fail(f"--implicit-from-step {from_step} is not below --steps {steps}: the implicit scale would never act")
    if detector_threshold and not detector:
        fail("--detector-threshold only acts with --detector (the folder of a saved concept probe)")
    if named_late is not None and not detector:
        fail("--named-late only acts with --detector (the folder of a saved concept probe) and "
             "--implicit-from-step >= 1: give both or leave --named-late out")
    if rival_late is not None and not detector:
        fail("--rival-late only acts with --detector (the folder of a saved concept probe) and "
             "--implicit-from-step >= 1: give both or leave --rival-late out")
    if rewind and not detector:
        fail("--rewind redoes the samples a --detector flagged: give --detector (and --implicit-from-step >= 1)")
    dets = tuple(_detector(d, words["--concept-word"], p, from_step) for d, p in zip(detector or [], thresholds))
    det = None if not dets else dets[0] if len(dets) == 1 else dets
    return dict(concept_words=words["--concept-word"], rival_words=words["--rival"], implicit=imp,
                implicit_negative=imp_neg, match=match or "embedding", implicit_from_step=from_step, detector=det,
                named_late=late, rewind=bool(rewind), rival_late=rival_scale)


def _detector(path: Path, concept_words: list[str], threshold: float, from_step: int):
    """One --detector: the saved probe's verdict for the first --concept-word it was fitted on; its step must come
    before --implicit-from-step (the step from which the samples it flags are steered)."""
    if from_step < 1:
        fail("--detector needs --implicit-from-step >= 1, later than the step its probe reads: the implicit scale "
             "waits for the probe's verdict")
    probe = read_probe(path)
    word = next((w for w in concept_words if w in probe.concepts), None)
    if word is None:
        fail(f"--detector {path}: the probe was fitted on {', '.join(probe.concepts)}, none of --concept-word "
             f"({', '.join(concept_words)}); give a probe fitted on the concept, or name it as the probe does")
    if probe.step >= from_step:
        fail(f"--detector {path} reads step {probe.step}: --implicit-from-step must be above it (got {from_step})")
    return probe.detector(word, threshold)
