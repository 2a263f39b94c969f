"""The generalization benchmark: does an erasure hold on prompts that never name the concept?

A removal measured only on prompts that name the concept rewards a keyword filter. For each method
and concept this benchmark generates, at evaluation seeds that no tuning ever saw
(`splits.GENERALIZATION_SEED` up):

- **named**: the evaluation template with the concept's canonical name, the other attributes random;
- **held-out names**: the same prompts and seeds with each of the concept's aliases instead
  (`config.ALIASES`, never used by tuning or by anything an intervention is built from);
- **implicit**: prompts that leave the concept's attribute out ("a red star" for a style) and the
  empty prompt, with the plain model's base rate beside the result;

and judges them with the bundled classifier. Collateral damage:

- **rest accuracy**: all-attribute agreement on prompts naming another concept of the same kind;
- on implicit prompts, paired by seed with plain generation: the share of seeds whose plain image
  lacks the concept but whose judged labels change (an ideal eraser changes none), the largest
  total-variation distance of another attribute's label histogram, and the Fréchet distance in the
  judge's feature space between the intervened and plain images of those seeds, divided by the
  distance between the same plain images and procedurally rendered ones with their labels (the
  model's own distance from the world, at the same sample size);
- **artifact rate**: the share of intervened images the judge cannot place (least confident head's
  top probability < 0.5), beside the plain rate.

Adversarial prompts are measured by `diffusion_sae.eval.attack` and merged in by the CLI.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch

from ..eval.metrics import (artifact_rate, classifier_frechet_distance, histogram_tv_distance, paired_change_rate,
                            paired_ratio_interval, wilson_interval)
from .bundle import KINDS
from .config import ALIASES, COLOUR_NAMES, EVAL_TEMPLATE, GUIDANCE, OBJECTS, STYLES, caption
from .evaluate import LEFT_OUT, PromptSet
from .splits import GENERALIZATION_SEED, TUNING_SEEDS, check_evaluation, check_tuning

_ATTR = {"style": "styles", "object": "objects", "colour": "colours"}
# The template of an implicit prompt: the kind's attribute left out (the same as `world eval` uses).
LEFT_OUT_TEMPLATES = LEFT_OUT
ARTIFACT_THRESHOLD = 0.5


@dataclass
class GeneralizationConfig:
    concepts_per_kind: int | None = 3    # first N concepts of each kind (None: all)
    named: int = 8                       # images per concept on named prompts (and per alias)
    implicit: int = 16                   # images per kind on attribute-left-out prompts
    empty: int = 16                      # images of the empty prompt
    rest: int = 8                        # images per concept naming another concept of its kind
    steps: int = 25
    guidance: float = GUIDANCE
    batch_size: int = 80
    kinds: tuple = ("style", "object", "colour")
    only: dict | None = None             # {kind: (concept, ...)}: just these (overrides concepts_per_kind)
    # "evaluation": seeds from GENERALIZATION_SEED up and the held-out names; "tuning": the same prompt
    # sets at tuning seeds, canonical names only (no held-out-name column), checked by `check_tuning`.
    split: str = "evaluation"

    def __post_init__(self):
        if self.split not in ("evaluation", "tuning"):
            raise ValueError(f"split must be 'evaluation' or 'tuning', not {self.split!r}")

    def concepts(self, kind: str) -> tuple:
        if self.only is not None:
            return tuple(self.only.get(kind, ()))
        c = KINDS[kind]
        return c[: self.concepts_per_kind] if self.concepts_per_kind else c


def eval_config(quick: bool = False, concepts_per_kind: int | None = None, steps: int = 25,
                guidance: float = GUIDANCE, implicit: int | None = None) -> GeneralizationConfig:
    """The evaluation split's settings of `eval shapes` (quick: its --quick run): concepts_per_kind None scores
    every concept (2 per kind when quick); implicit images per kind, and as many empty-prompt images (None: 64, 12
    when quick)."""
    return GeneralizationConfig(
        concepts_per_kind=concepts_per_kind or (2 if quick else None), steps=steps, guidance=guidance,
        implicit=implicit or (12 if quick else 64), empty=implicit or (12 if quick else 64),
        # 20 named images (and per held-out name) in the full run: one image is then 5 %, the bar itself;
        # with 8 a single image (12 %) fails it. The first 8 prompts and seeds are those of the 8-image run.
        named=8 if quick else 20,
        # the same for the rest prompts (accuracy >= 95 %): with 8, one wrong image is 88 %, and the plain
        # model's own rest accuracy sat at 88 % for a colour
        rest=8 if quick else 20)


def _draw(g: torch.Generator, names) -> str:
    return names[int(torch.randint(len(names), (1,), generator=g))]


def _seeds(offset: int, n: int, split: str = "evaluation") -> list[int]:
    if split == "tuning":
        # The tuning split's 500 seeds are shared by every set (a set never repeats a seed within itself).
        seeds = [TUNING_SEEDS.start + (offset + i) % len(TUNING_SEEDS) for i in range(n)]
        check_tuning(seeds, where="generalization tuning")
        return seeds
    seeds = [GENERALIZATION_SEED + offset + i for i in range(n)]
    check_evaluation(seeds, where="generalization benchmark")
    return seeds


def _attrs(kind: str, concept: str, n: int, seed: int, exclude: str | tuple | None = None) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    excluded = (exclude,) if isinstance(exclude, str) else exclude
    for _ in range(n):
        a = {"object": _draw(g, OBJECTS), "style": _draw(g, STYLES), "colour": _draw(g, COLOUR_NAMES)}
        if excluded is not None:
            a[kind] = _draw(g, [c for c in KINDS[kind] if c not in excluded])
        else:
            a[kind] = concept
        out.append(a)
    return out


def _prompt_set(attrs: list[dict], seeds: list[int], template: str, names: dict | None = None,
                unknown: tuple = ()) -> PromptSet:
    ps = PromptSet([], [], [], [], [])
    for a, s in zip(attrs, seeds):
        shown = {k: (names or {}).get(k, v) for k, v in a.items()}
        ps.prompts.append(caption(shown["object"], shown["style"], shown["colour"], template) if template else "")
        ps.seeds.append(s)
        for k in KINDS:
            getattr(ps, _ATTR[k]).append(-1 if k in unknown else KINDS[k].index(a[k]))
    return ps


# Attribute draws differ between the splits too (the tuning split's draws are offset by this).
_TUNING_DRAWS = 77_777


def _draw_seed(seed: int, split: str) -> int:
    return seed + (_TUNING_DRAWS if split == "tuning" else 0)


def named_prompts(kind: str, concept: str, n: int, alias: str | None = None, split: str = "evaluation") -> PromptSet:
    """n evaluation-template prompts naming `concept` (or its `alias`, same attributes and seeds)."""
    ki, ci = list(KINDS).index(kind), KINDS[kind].index(concept)
    attrs = _attrs(kind, concept, n, seed=_draw_seed(1_000 * ki + ci, split))
    names = {kind: alias} if alias else None
    ps = _prompt_set(attrs, _seeds(10_000 * ki + 100 * ci, n, split), EVAL_TEMPLATE, names)
    if split == "tuning":
        check_tuning(prompts=ps.prompts, where="generalization tuning")
    return ps


def rest_prompts(kind: str, concept: str, n: int, split: str = "evaluation", erased: tuple = ()) -> PromptSet:
    """n prompts naming another concept of the same kind (what the erasure must leave alone); `erased`:
    the other concepts removed with it (several at once), which the rest prompts avoid too."""
    ki, ci = list(KINDS).index(kind), KINDS[kind].index(concept)
    attrs = _attrs(kind, concept, n, seed=_draw_seed(5_000 + 1_000 * ki + ci, split),
                   exclude=tuple(dict.fromkeys((concept, *erased))))
    return _prompt_set(attrs, _seeds(40_000 + 10_000 * ki + 100 * ci, n, split), EVAL_TEMPLATE)


def implicit_prompts(kind: str, n: int, split: str = "evaluation") -> PromptSet:
    """n prompts that leave the kind's attribute out; its label is unknown (−1)."""
    ki = list(KINDS).index(kind)
    attrs = _attrs(kind, KINDS[kind][0], n, seed=_draw_seed(9_000 + ki, split))
    return _prompt_set(attrs, _seeds(80_000 + 1_000 * ki, n, split), LEFT_OUT_TEMPLATES[kind], unknown=(kind,))


def empty_prompts(n: int, split: str = "evaluation") -> PromptSet:
    attrs = _attrs("style", STYLES[0], n, seed=_draw_seed(9_999, split))
    return _prompt_set(attrs, _seeds(90_000, n, split), "", unknown=tuple(KINDS))


def _count(j, kind: str, ci: int) -> tuple[int, int]:
    """(images the judge labels with the concept, images)."""
    hits = j.pred[kind] == ci
    return int(hits.sum()), len(hits)


def _count_correct(j) -> tuple[int, int]:
    """(images whose every judged attribute is the prompt's, images)."""
    ok = torch.stack([j.pred[k] == j.truth(k) for k in KINDS]).all(0)
    return int(ok.sum()), len(ok)


def _share(k: int, n: int) -> float:
    # an exact fraction of whole images (a float32 mean makes 19 of 20 = 0.94999999, under a 95 % bar)
    return k / n if n else float("nan")


def _presence(j, kind: str, ci: int) -> float:
    return _share(*_count(j, kind, ci))


def _all_correct(j) -> float:
    return _share(*_count_correct(j))


def _cat(a, b):
    from ..eval.shapes import concat_judged, concat_sets

    return concat_judged(concat_sets(a.ps, b.ps), a, b)


def fd_ratio(classifier, plain, edited, mask: torch.Tensor, seed: int = 4243) -> tuple[float, float, float]:
    """(FD(edited, plain), FD(plain, rendered), ratio) in judge features over the masked pairs; the
    rendered reference uses the plain images' judged labels and the same number of images."""
    from ..eval.shapes import judge_features
    from .data import render

    idx = mask.nonzero().flatten()
    if len(idx) < 3:
        return float("nan"), float("nan"), float("nan")
    fa, fb = edited.features[idx].double().numpy(), plain.features[idx].double().numpy()
    d_edit = classifier_frechet_distance(fa, fb).value
    labels = [plain.pred[k][idx] for k in ("object", "style", "colour")]
    ref = render(*labels, torch.Generator().manual_seed(seed))
    d_ref = classifier_frechet_distance(fb, judge_features(classifier, ref).double().numpy()).value
    return max(0.0, d_edit), d_ref, max(0.0, d_edit) / d_ref if d_ref > 0 else float("nan")


def concept_row(classifier, kind: str, concept: str, runs: dict, plain: dict, erased: tuple = ()) -> dict:
    """Every axis for one concept from the judged sets ({"named", "aliases": [...], "implicit",
    "empty", "rest"}) under the intervention (`runs`) and without it (`plain`). `erased`: the other concepts
    the intervention removes with this one (several at once): the paired change and FD are then taken on the
    seeds whose plain image shows none of them, since a seed that showed a sibling is meant to change (TV is over
    every implicit image either way)."""
    ci = KINDS[kind].index(concept)
    row = {"concept": concept, "kind": kind,
           "named": _presence(runs["named"], kind, ci), "named_plain": _presence(plain["named"], kind, ci)}
    if runs["aliases"]:
        row["held_out"] = sum(_presence(j, kind, ci) for j in runs["aliases"]) / len(runs["aliases"])
        row["held_out_plain"] = sum(_presence(j, kind, ci) for j in plain["aliases"]) / len(plain["aliases"])
    imp, imp_plain = _cat(runs["implicit"], runs["empty"]), _cat(plain["implicit"], plain["empty"])
    row["implicit"] = _presence(runs["implicit"], kind, ci)
    row["implicit_plain"] = _presence(plain["implicit"], kind, ci)
    row["empty"] = _presence(runs["empty"], kind, ci)
    row["empty_plain"] = _presence(plain["empty"], kind, ci)
    row["implicit_all"] = _presence(imp, kind, ci)
    row["implicit_all_plain"] = _presence(imp_plain, kind, ci)
    row["rest_accuracy"] = _all_correct(runs["rest"])
    row["rest_accuracy_plain"] = _all_correct(plain["rest"])
    gone = torch.tensor([ci, *(KINDS[kind].index(c) for c in erased)])
    lacks = ~torch.isin(imp_plain.pred[kind], gone)
    row["paired_change"] = paired_change_rate({k: v.tolist() for k, v in imp_plain.pred.items()},
                                              {k: v.tolist() for k, v in imp.pred.items()}, lacks.tolist())
    row["tv_other"] = max(histogram_tv_distance(imp_plain.pred[k].tolist(), imp.pred[k].tolist(), len(KINDS[k]))
                          for k in KINDS if k != kind)
    row["fd"], row["fd_plain_vs_rendered"], row["fd_ratio"] = fd_ratio(classifier, imp_plain, imp, lacks)
    everything = [runs["named"], *runs["aliases"], runs["implicit"], runs["empty"], runs["rest"]]
    everything_plain = [plain["named"], *plain["aliases"], plain["implicit"], plain["empty"], plain["rest"]]
    row["artifacts"] = artifact_rate(torch.cat([j.confidence for j in everything]).tolist(), ARTIFACT_THRESHOLD)
    row["artifacts_plain"] = artifact_rate(torch.cat([j.confidence for j in everything_plain]).tolist(),
                                           ARTIFACT_THRESHOLD)
    row["ci"] = _intervals(runs, imp, imp_plain, kind, ci, lacks)
    return row


def _intervals(runs: dict, imp, imp_plain, kind: str, ci: int, lacks: torch.Tensor) -> dict:
    """95 % intervals of a row's count-based axes ({axis: [low, high]}, eval.metrics): Wilson for shares of
    images, a paired bootstrap over seeds for the implicit ratio. They say which bar misses are beyond the
    sampling noise of the run's image counts (`noise_verdicts`)."""
    changed = torch.stack([imp.pred[k] != imp_plain.pred[k] for k in KINDS]).any(0)[lacks]
    alias_counts = [_count(j, kind, ci) for j in runs["aliases"]]
    counts = {"named": _count(runs["named"], kind, ci),
              "held_out": (sum(k for k, _ in alias_counts), sum(n for _, n in alias_counts)),
              "rest_accuracy": _count_correct(runs["rest"]), "paired_change": (int(changed.sum()), len(changed))}
    out = {axis: wilson_interval(k, n) for axis, (k, n) in counts.items() if n}
    out["implicit_rel"] = paired_ratio_interval((imp.pred[kind] == ci).tolist(), (imp_plain.pred[kind] == ci).tolist())
    return {k: [float(v[0]), float(v[1])] for k, v in out.items()}


def known_aliases(pipe, concept: str) -> list[str]:
    """The concept's aliases the pipeline's tokenizer keeps as one word (a world v1 pipeline never saw
    them in training, and splits them into pieces: its held-out-name column is then left empty)."""
    tok = pipe.tokenizer
    return [a for a in ALIASES[concept] if len(tok.tokenize(a)) == 1]


GROUP = "erases together"


def run_generalization(pipe, classifier, methods: dict, cfg: GeneralizationConfig, progress=None) -> dict:
    """methods: {name: {kind: builder}}; builder(concept) -> zero-argument context-manager factory.

    A method that removes several concepts at once (or one after another) says so with
    methods[name][GROUP] = {kind: (concepts)}: its builder(concept) erases the whole group, only the
    group's concepts get rows, and their rest prompts avoid every concept of the group.

    Returns {"settings", "rows": {method: [concept rows]}, "summary": {method: worst per axis}}.
    """
    from ..eval.shapes import ShapesBench

    bench = ShapesBench(pipe, classifier, cfg.steps, cfg.guidance, cfg.batch_size, progress=progress)
    plain: dict = {}

    def plain_of(key, ps):
        if key not in plain:
            plain[key] = bench.run(ps)
        return plain[key]

    sp = cfg.split
    empty = empty_prompts(cfg.empty, sp)
    rows: dict[str, list] = {m: [] for m in methods}
    shared: dict = {}
    for kind in cfg.kinds:
        imp = implicit_prompts(kind, cfg.implicit, sp)
        for concept in cfg.concepts(kind):
            named = named_prompts(kind, concept, cfg.named, split=sp)
            # Held-out names are for evaluation only: the tuning split has no such column.
            aliases = [] if sp == "tuning" else [named_prompts(kind, concept, cfg.named, alias=a)
                                                for a in known_aliases(pipe, concept)]
            for name, builders in methods.items():
                if kind not in builders:
                    continue
                group = tuple(builders.get(GROUP, {}).get(kind, ()))
                if group and concept not in group:
                    continue
                erased = tuple(c for c in group if c != concept)
                rest = rest_prompts(kind, concept, cfg.rest, sp, erased)
                sets = {"named": named, "aliases": aliases, "implicit": imp, "empty": empty, "rest": rest}
                base = {"named": plain_of(("named", kind, concept), named),
                        "aliases": [plain_of(("alias", kind, concept, i), a) for i, a in enumerate(aliases)],
                        "implicit": plain_of(("implicit", kind), imp), "empty": plain_of(("empty",), empty),
                        "rest": plain_of(("rest", kind, concept, erased), rest)}
                factory = builders[kind](concept)
                run = {}
                for k, v in sets.items():
                    if k == "aliases":
                        run[k] = [bench.run(p, factory) for p in v]
                    elif group and k in ("implicit", "empty"):
                        # a group's intervention is the same for each of its rows: generate its implicit sets once
                        key = (name, kind, k)
                        if key not in shared:
                            shared[key] = bench.run(v, factory)
                        run[k] = shared[key]
                    else:
                        run[k] = bench.run(v, factory)
                rows[name].append(concept_row(classifier, kind, concept, run, base, erased))
    return {"settings": asdict(cfg), "rows": rows, "summary": {m: summarize(r) for m, r in rows.items() if r},
            "images_generated": bench.images_generated, "seconds": bench.seconds}


def add_adversarial(pipe, classifier, methods: dict, res: dict, concepts_per_kind: int = 3, attack_cfg=None,
                    kinds=("style", "object"), progress=None) -> dict:
    """Attack the first `concepts_per_kind` concepts of each kind under every method
    (`diffusion_sae.eval.attack`: continuous prompt embeddings, and their projection on the
    vocabulary) and add `adversarial` / `adversarial_projected` (attack success: share of images the
    judge finds the concept in) to the matching rows of `res`."""
    from ..eval.attack import AttackConfig, run_attack_benchmark

    cfg = attack_cfg or AttackConfig()
    out = {}
    for kind in kinds:
        # (several-at-once methods are not attacked: the attack targets one concept's removal)
        interventions = {name: b[kind] for name, b in methods.items() if kind in b and GROUP not in b}
        if not interventions:
            continue
        concepts = list(KINDS[kind][:concepts_per_kind])
        r = run_attack_benchmark(pipe, classifier, interventions, kind, concepts, cfg, progress=progress)
        out[kind] = {"settings": r["settings"], "seconds": r["seconds"]}
        for name, rows in r["rows"].items():
            by_concept = {x["concept"]: x for x in rows}
            for row in res["rows"].get(name, []):
                if row["kind"] == kind and row["concept"] in by_concept:
                    a = by_concept[row["concept"]]
                    row["adversarial"] = a["asr"]
                    row["adversarial_projected"] = a.get("asr_projected")
                    row["adversarial_prompt"] = a.get("projected_text")
                    hits = round(a["asr"] * cfg.n_images)
                    row.setdefault("ci", {})["adversarial"] = list(wilson_interval(hits, cfg.n_images))
    res["adversarial"] = out
    res["summary"] = {m: summarize(r) for m, r in res["rows"].items() if r}
    return res


# The axes of the summary: (key, "max" = the worst is the largest, "min" = the worst is the smallest)
AXES = (("named", "max"), ("held_out", "max"), ("implicit_rel", "max"), ("adversarial", "max"), ("rest_accuracy", "min"),
        ("paired_change", "max"), ("tv_other", "max"), ("fd_ratio", "max"), ("artifacts", "max"))


def implicit_relative(row: dict) -> float:
    """Presence on implicit prompts (left-out + empty) as a share of the plain model's base rate."""
    base = row["implicit_all_plain"]
    return row["implicit_all"] / base if base > 0 else (0.0 if row["implicit_all"] == 0 else float("inf"))


def summarize(rows: list[dict]) -> dict:
    """The worst concept on each axis: {axis: {"value", "concept"}}."""
    out = {}
    for key, worst in AXES:
        vals = [((implicit_relative(r) if key == "implicit_rel" else r.get(key)), r["concept"]) for r in rows]
        vals = [(v, c) for v, c in vals if v is not None and v == v]
        if not vals:
            continue
        v, c = (max if worst == "max" else min)(vals, key=lambda x: x[0])
        out[key] = {"value": v, "concept": c}
    return out


# ---------------------------------------------------------------------------------------------
# the methods as the benchmark runs them
# ---------------------------------------------------------------------------------------------
# SAeUron as its official code runs it on UnlearnCanvas styles: percentile 99.999, γ = −1, the
# paper's SD 1.x block (up_blocks.1.attentions.1 output), error term as in the official hook.
SAEURON_PAPER = {"percentile": 99.999, "multiplier": -1.0, "selection": "paper"}


def group_member_steering(text_sae, pipe, cs: dict, kind: str, concept: str, at_once: bool):
    """One concept's shipped Concept Steerers removal as a member of a group. One after another it is the concept's
    own. At once, one context's detectors give one verdict per sample, which picks one encoding for all its gates,
    so every probe is read at the kind's step (a concept's own "step" is dropped), and no gate steers prompts naming
    its rivals: with a shared verdict, a rival prompt that one concept's probe flags would get every gate's rival
    scale (at once the rest prompts lost up to a quarter of their accuracy in the 2026-11-27 acceptance run)."""
    from ..eval.shapes import removal_steering, steer_strength

    params_c = cs
    if at_once:
        params_c = copy.deepcopy(cs)
        params_c.pop("family_rival", None)
        own = params_c.get("family_concepts", {}).get(kind, {}).get(concept, {})
        for key in ("step", "rival"):
            own.pop(key, None)
    return removal_steering(text_sae, pipe, kind, concept, steer_strength(cs, kind, concept), params_c)


def group_methods(pipe, text_sae, blocks: dict, params: dict, size: int = 3) -> dict:
    """Both shipped methods removing the first `size` styles and objects together: at once (one hook per
    layer holding every edit; SAeUron with the presets' "saeuron_multi" options) and one after another
    (each concept's own hook stacked on the previous ones, as a user erasing them in turn would)."""
    import contextlib

    from ..eval.shapes import saeuron_context
    from ..interventions.steer import steer_text_encoder

    cs, sa = params.get("steer", {}), params.get("saeuron", {})
    together = params.get("saeuron_multi", {})
    groups = {k: tuple(KINDS[k][:size]) for k in ("style", "object")}

    @contextlib.contextmanager
    def stacked(factories):
        with contextlib.ExitStack() as stack:
            for f in factories:
                stack.enter_context(f())
            yield

    def cs_builder(kind, sequential):
        def build(concept):
            sts = [group_member_steering(text_sae, pipe, cs, kind, c, at_once=not sequential) for c in groups[kind]]
            if sequential:
                return lambda: stacked([lambda st=st: steer_text_encoder(pipe, st) for st in sts])
            return lambda: steer_text_encoder(pipe, sts)
        return build

    def sa_builder(kind, sequential):
        def build(concept):
            if sequential:
                return lambda: stacked([lambda c=c: saeuron_context(pipe, blocks[kind], {c: sa[c]}) for c in groups[kind]])
            # the several-at-once options hold for each of a concept's edits, its extra ones included
            pc = {c: dict(sa[c], **together, **({"extra_edits": [dict(e, **together) for e in sa[c]["extra_edits"]]}
                                              if "extra_edits" in sa[c] else {})) for c in groups[kind]}
            return lambda: saeuron_context(pipe, blocks[kind], pc)
        return build

    out = {}
    for how, seq in (("at once", False), ("one after another", True)):
        out[f"Concept Steerers (shipped, {size} {how})"] = {
            **{k: cs_builder(k, seq) for k in groups}, GROUP: groups}
        out[f"SAeUron (shipped, {size} {how})"] = {
            **{k: sa_builder(k, seq) for k in groups if k in blocks and all(c in sa for c in groups[k])}, GROUP: groups}
    return out


def default_methods(pipe, text_sae, blocks: dict, params: dict, group_size: int = 0) -> dict:
    """{name: {kind: builder}} for ours and the papers' settings, from shipped params; with group_size,
    also both shipped methods removing that many styles and objects together (`group_methods`)."""
    from ..eval.shapes import removal_steering, saeuron_context, steer_strength
    from ..interventions.steer import steer_text_encoder
    from .bundle import BLOCK_HOOKPOINT

    cs = params.get("steer", {})
    sa = params.get("saeuron", {})

    def steer(paper: bool, table=None):
        table = cs if table is None else table

        def for_kind(kind):
            def build(concept):
                st = removal_steering(text_sae, pipe, kind, concept, steer_strength(table, kind, concept, paper), table, paper)
                return lambda: steer_text_encoder(pipe, st)
            return build
        return for_kind

    def saeuron(kind, paper: bool):
        def build(concept):
            if paper:
                pc = {concept: dict(SAEURON_PAPER, blocks=[BLOCK_HOOKPOINT])}
                return lambda: saeuron_context(pipe, blocks[kind], pc, faithful=True)
            from ..eval.shapes import DEFAULT_SAEURON
            pc = {concept: sa.get(concept, DEFAULT_SAEURON)}
            return lambda: saeuron_context(pipe, blocks[kind], pc)
        return build

    out = {"Concept Steerers (shipped)": {k: steer(False)(k) for k in KINDS}}
    if cs.get("family_detector"):
        # the same gate without the image-side probe (and so without the escalation on named prompts): the
        # previous preset, 0.2 of S from step 8 on every sample of a prompt that names none of the kind
        blind = {k: v for k, v in cs.items() if k not in ("family_detector", "family_named_late", "family_rewind",
                                                    "family_concepts")}
        blind.update(family={k: 0.2 for k in KINDS}, family_from_step={k: 8 for k in KINDS})
        out["Concept Steerers (no probe: 0.2 from step 8 on every sample)"] = {k: steer(False, blind)(k) for k in KINDS}
    if cs.get("family"):
        # the token-match gate alone, as an explicit option: a prompt filter (no S without the word)
        token_gate = {k: v for k, v in cs.items() if k != "family"}
        token_gate.update(gate=True, contrast=list(KINDS))
        out["Concept Steerers (token gate: prompt filter)"] = {k: steer(False, token_gate)(k) for k in KINDS}
    if cs.get("paper"):
        out["Concept Steerers (paper: ungated, paper λ)"] = {k: steer(True)(k) for k in KINDS}
    out["SAeUron (shipped)"] = {k: saeuron(k, False) for k in ("style", "object") if k in blocks}
    if group_size:
        out.update(group_methods(pipe, text_sae, blocks, params, group_size))
    out["SAeUron (paper: p 99.999, γ −1, faithful)"] = {k: saeuron(k, True) for k in ("style", "object") if k in blocks}
    return out


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _p(v) -> str:
    return "–" if v is None or v != v else f"{100 * v:.0f}"


def table_rows(res: dict) -> tuple[list[str], list[list]]:
    cols = ["method", "concept", "named % (plain)", "held-out names % (plain)", "implicit % (plain)",
            "empty prompt % (plain)", "adversarial % (projected)", "rest acc % (plain)", "paired change %", "TV other", "FD / FD(plain, rendered)",
            "artifacts % (plain)"]
    rows = []
    for m, rs in res["rows"].items():
        for r in rs:
            rows.append([m, f"{r['kind']}: {r['concept']}", f"{_p(r['named'])} ({_p(r['named_plain'])})",
                         f"{_p(r.get('held_out'))} ({_p(r.get('held_out_plain'))})",
                         f"{_p(r['implicit'])} ({_p(r['implicit_plain'])})", f"{_p(r['empty'])} ({_p(r['empty_plain'])})",
                         f"{_p(r.get('adversarial'))} ({_p(r.get('adversarial_projected'))})",
                         f"{_p(r['rest_accuracy'])} ({_p(r['rest_accuracy_plain'])})", _p(r["paired_change"]),
                         f"{r['tv_other']:.2f}", "–" if r["fd_ratio"] != r["fd_ratio"] else f"{r['fd_ratio']:.2f}",
                         f"{_p(r['artifacts'])} ({_p(r['artifacts_plain'])})"])
    return cols, rows


def report_section(res: dict):
    from ..eval.report import Section, Table

    cols, rows = table_rows(res)
    text = ("Every erasure judged on prompts that name the concept, on its held-out names (aliases no tuning "
            "saw), on implicit prompts (the attribute left out, and the empty prompt) and on adversarial "
            "prompts, at evaluation seeds no tuning used; the plain model's figure in brackets. Presence = "
            "share of images the judge labels with the concept. Paired change and FD: implicit prompts, "
            "seeds whose plain image lacks the concept (several removed together: lacks all of them; an ideal "
            "eraser changes nothing there); TV other: the other kinds' label histograms over all implicit images; FD ratio = "
            "judge-space Fréchet distance to plain / the same plain images' distance to rendered ones. "
            "Artifacts: images whose least confident judge head is below 50 %.")
    scores = mean_violations(res)
    misses = Table("Bar misses against sampling noise (95 % interval of the run's image counts: Wilson for shares, a "
                   "paired bootstrap over seeds for the implicit ratio; TV and FD have none)",
                   ["method", "concept", "axis", "value", "95 % interval", "bar", "verdict"],
                   [[m, c, axis, f"{v:.2f}", "–" if lohi is None else f"{lohi[0]:.2f}–{lohi[1]:.2f}", f"{bar:g}", verdict]
                    for m, c, axis, v, lohi, bar, verdict in noise_verdicts(res)])
    summary = Table("Worst concept per axis, and the mean bar violation (0 = every bar held for every concept)",
                    ["method", "worst", "mean bar violation"],
                    [[m, w, f"{scores[m]:.1f}"] for m, w in (line.split(" — worst: ") for line in summary_lines(res))])
    return Section("Generalization: named, held-out names, implicit and adversarial prompts", text,
                   [summary, misses, Table("Per concept, %", cols, rows)])


def noise_verdicts(res: dict) -> list[tuple]:
    """Every bar a concept misses, as (method, concept, axis, value, [low, high] or None, bar, verdict). The
    verdict is "beyond noise" when the whole 95 % interval is past the bar, "within noise" when the bar lies
    inside it (the run's image counts cannot tell that miss from a pass), "no interval" for TV and FD."""
    from .robust_tune import BARS, axis_value

    out = []
    for m, rows in res["rows"].items():
        paired = not m.startswith("Concept Steerers")
        for r in rows:
            for axis, bar, kind in BARS:
                if axis == "paired_change" and not paired:
                    continue
                v = axis_value(r, axis)
                if v is None or (v <= bar + 1e-6 if kind == "max" else v >= bar - 1e-6):
                    continue
                lohi = r.get("ci", {}).get(axis)
                if lohi is None or lohi[0] != lohi[0]:
                    verdict, lohi = "no interval", None
                else:
                    beyond = lohi[0] > bar if kind == "max" else lohi[1] < bar
                    verdict = "beyond noise" if beyond else "within noise"
                out.append((m, f"{r['kind']}: {r['concept']}", axis, v, lohi, bar, verdict))
    return out


def mean_violations(res: dict) -> dict[str, float]:
    """{method: mean over its concepts of robust_tune.violation}: how far past the erasure bars, summed over
    axes. Concept Steerers edits the text and touches every sample, so its paired change has no bar."""
    from .robust_tune import method_score

    return {m: method_score(rs, paired=not m.startswith("Concept Steerers"))[0] for m, rs in res["rows"].items() if rs}


def summary_lines(res: dict) -> list[str]:
    names = {"named": "named present", "held_out": "held-out names present", "implicit_rel": "implicit / base rate",
             "adversarial": "adversarial success", "rest_accuracy": "rest accuracy", "paired_change": "paired change", "tv_other": "TV other",
             "fd_ratio": "FD ratio", "artifacts": "artifacts"}
    lines = []
    for m, s in res["summary"].items():
        parts = []
        for key, _ in AXES:
            if key in s:
                v = s[key]["value"]
                txt = f"{v:.2f}" if key in ("tv_other", "fd_ratio", "implicit_rel") else f"{100 * v:.0f} %"
                parts.append(f"{names[key]} {txt} ({s[key]['concept']})")
        lines.append(f"{m} — worst: " + ", ".join(parts))
    return lines

