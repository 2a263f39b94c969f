"""The generalization benchmark: split guards, its metrics on hand-computed cases, its prompt sets."""
import math
import re

import pytest
import torch

from diffusion_sae.eval.metrics import (MetricInputError, artifact_rate, histogram_tv_distance,
                                        paired_change_rate)
from diffusion_sae.world import generalization as gen
from diffusion_sae.world.config import ALIASES, COLOUR_NAMES, OBJECTS, STYLES, canonical_of, names_of
from diffusion_sae.world.splits import (HELD_OUT_NAMES, TUNING_SEEDS, SplitError, check_evaluation,
                                        check_tuning, held_out_names_in)


# --- splits ---------------------------------------------------------------------------------------
def test_tuning_guard_rejects_evaluation_seed_and_held_out_name():
    check_tuning([500, 999], ["a red star in striped style"])          # tuning data passes
    with pytest.raises(SplitError, match="seed 0 is not a tuning seed"):
        check_tuning([500, 0])
    with pytest.raises(SplitError, match="held-out name 'crimson'"):
        check_tuning([], ["a crimson star in striped style"])
    with pytest.raises(SplitError, match="tuning split"):
        check_evaluation([100_000, TUNING_SEEDS.start])


def test_tuning_entry_points_raise_on_evaluation_data():
    from diffusion_sae.eval.tune import tuning_set
    from diffusion_sae.world.bundle import concept_prompts

    ps = tuning_set("style", "striped", 16)
    assert all(s in TUNING_SEEDS for s in ps.seeds)
    with pytest.raises(SplitError):
        tuning_set("style", "striped", 16, seed=0)    # the benchmark's grid seeds
    assert all(not held_out_names_in(p) for v in concept_prompts("colour", 3).values() for p in v)


def test_aliases_are_distinct_whole_words():
    names = [n for c in ALIASES for n in names_of(c)]
    assert len(names) == len(set(names)) == 3 * (len(OBJECTS) + len(STYLES) + len(COLOUR_NAMES))
    for a in HELD_OUT_NAMES:
        assert canonical_of(a) != a and a.isalpha()
        # no held-out name contains another name or is contained in one (a keyword filter on the
        # canonical word must not catch its alias by accident)
        assert not [b for b in names if b != a and (b in a or a in b) and canonical_of(b) == canonical_of(a)]
    assert held_out_names_in("An Ombre, crimson disc") == ["ombre", "crimson", "disc"]


def test_world_v2_tokenizer_keeps_every_name_whole():
    from diffusion_sae.world.tokenizer import build_tokenizer

    tok = build_tokenizer()
    for n in names_of("striped") + names_of("red") + names_of("heart"):
        assert len(tok.tokenize(n)) == 1, n


def test_v2_captions_use_aliases_and_leave_every_attribute_out():
    from diffusion_sae.world.data import make_captions, sample_concepts

    g = torch.Generator().manual_seed(0)
    o, s, c = sample_concepts(2000, g)
    caps = make_captions(o, s, c, g, p_partial=0.5)
    with_alias = sum(bool(held_out_names_in(x)) for x in caps) / len(caps)
    assert 0.6 < with_alias < 0.95          # each named attribute uses an alias half of the time
    assert "a shape" in caps and "an image" in caps               # every attribute left out
    words = [set(re.findall(r"[a-z]+", x)) for x in caps]
    no_object = [w for w in words if not any(n in w for ob in OBJECTS for n in names_of(ob))]
    assert len(no_object) / len(caps) > 0.1


# --- metrics (hand-computed) ----------------------------------------------------------------------
def test_histogram_tv_distance_by_hand():
    # p = (2/4, 2/4, 0), q = (1/4, 1/4, 2/4): ½(1/4 + 1/4 + 2/4) = 0.5
    assert histogram_tv_distance([0, 0, 1, 1], [0, 1, 2, 2], 3) == pytest.approx(0.5)
    assert histogram_tv_distance([2, 1], [1, 2], 3) == 0.0
    assert histogram_tv_distance([0], [1], 2) == 1.0
    with pytest.raises(MetricInputError):
        histogram_tv_distance([], [1], 2)
    with pytest.raises(MetricInputError):
        histogram_tv_distance([5], [1], 2)


def test_paired_change_rate_by_hand():
    before = {"object": [0, 1, 2, 3], "style": [0, 0, 0, 0]}
    after = {"object": [0, 1, 5, 3], "style": [0, 4, 0, 0]}
    assert paired_change_rate(before, after) == 0.5                 # pairs 1 and 2 changed
    assert paired_change_rate(before, after, [True, False, False, True]) == 0.0
    assert paired_change_rate(before, after, [False, True, True, True]) == pytest.approx(2 / 3)
    assert math.isnan(paired_change_rate(before, after, [False] * 4))
    with pytest.raises(MetricInputError):
        paired_change_rate(before, {"object": [0, 1, 2]})


def test_artifact_rate_by_hand():
    assert artifact_rate([0.9, 0.49, 0.2, 0.5], 0.5) == 0.5
    with pytest.raises(MetricInputError):
        artifact_rate([])


def test_classifier_confidence_is_the_least_confident_head():
    from diffusion_sae.world.assets import load_classifier
    from diffusion_sae.world.data import sample_batch

    clf = load_classifier()
    imgs = sample_batch(16, seed=3).images
    conf = clf.confidence(imgs)
    with torch.no_grad():
        logits = clf.eval()(imgs)
    by_hand = torch.stack([logits[k].softmax(-1).max(-1).values for k in logits]).min(0).values
    torch.testing.assert_close(conf, by_hand)
    assert float(conf.min()) > 0.5                                    # rendered images are easy
    assert float(clf.confidence(torch.rand(8, 3, 32, 32)).mean()) < float(conf.mean())


# --- prompt sets and a concept row ----------------------------------------------------------------
def test_prompt_sets_are_held_out_and_paired():
    named = gen.named_prompts("style", "striped", 4)
    alias = gen.named_prompts("style", "striped", 4, alias="banded")
    assert named.seeds == alias.seeds and all(s not in TUNING_SEEDS for s in named.seeds)
    assert [p.replace("striped", "banded") for p in named.prompts] == alias.prompts
    imp = gen.implicit_prompts("style", 6)
    assert all("style" not in p and not any(s in p for s in STYLES) for p in imp.prompts)
    assert imp.styles == [-1] * 6
    rest = gen.rest_prompts("colour", "red", 20)
    assert COLOUR_NAMES.index("red") not in rest.colours
    assert gen.empty_prompts(3).prompts == ["", "", ""]


def _judged(objects, styles, colours, truth=None, conf=None, feats=None):
    from diffusion_sae.eval.shapes import Judged
    from diffusion_sae.world.evaluate import PromptSet

    n = len(objects)
    t = truth or (objects, styles, colours)
    ps = PromptSet([""] * n, list(range(n)), *[list(v) for v in t])
    g = torch.Generator().manual_seed(n)
    return Judged(ps, {"object": torch.tensor(objects), "style": torch.tensor(styles), "colour": torch.tensor(colours)},
                  None, feats if feats is not None else torch.randn(n, 8, generator=g),
                  torch.tensor(conf if conf is not None else [0.9] * n))


def test_concept_row_by_hand():
    # erase style 1 ("striped"); 4 named images, 4 implicit, 2 empty, 2 rest
    plain = {"named": _judged([0, 1, 2, 3], [1, 1, 1, 0], [0, 0, 0, 0]), "aliases": [],
             "implicit": _judged([0, 1, 2, 3], [1, 1, 0, 2], [0, 1, 2, 3], truth=([0, 1, 2, 3], [-1] * 4, [0, 1, 2, 3])),
             "empty": _judged([4, 5], [0, 3], [1, 1], truth=([-1] * 2, [-1] * 2, [-1] * 2)),
             "rest": _judged([0, 1], [2, 3], [0, 0])}
    runs = {"named": _judged([0, 1, 2, 3], [0, 0, 1, 0], [0, 0, 0, 0]), "aliases": [],
            "implicit": _judged([0, 1, 2, 4], [0, 0, 0, 2], [0, 1, 2, 3], truth=([0, 1, 2, 3], [-1] * 4, [0, 1, 2, 3]),
                                conf=[0.9, 0.9, 0.3, 0.9]),
            "empty": _judged([4, 5], [0, 3], [1, 1], truth=([-1] * 2, [-1] * 2, [-1] * 2)),
            "rest": _judged([0, 1], [2, 0], [0, 0], truth=([0, 1], [2, 3], [0, 0]))}
    runs["implicit"].features = plain["implicit"].features.clone()
    runs["empty"].features = plain["empty"].features.clone()
    row = gen.concept_row(_StubJudge(), "style", "striped", runs, plain)
    assert row["named"] == 0.25 and row["named_plain"] == 0.75
    assert row["implicit"] == 0.0 and row["implicit_plain"] == 0.5
    assert row["implicit_all_plain"] == pytest.approx(2 / 6)
    assert row["rest_accuracy"] == 0.5 and row["rest_accuracy_plain"] == 1.0
    # seeds whose plain image lacks striped: implicit 2, 3 and both empty; only implicit 3 changed (object 3 -> 4)
    assert row["paired_change"] == 0.25
    # object histogram over the 6 implicit+empty images: one of six moved from 3 to 4 -> TV 1/6
    assert row["tv_other"] == pytest.approx(1 / 6)
    assert row["fd"] == pytest.approx(0.0, abs=1e-9)       # same features on the unchanged seeds
    assert row["artifacts"] == pytest.approx(1 / 12) and row["artifacts_plain"] == 0.0
    # erased with others (several at once): a seed whose plain image shows a sibling is meant to change, so the
    # paired change is taken on the seeds that show none of them. Dotted (2) with it: implicit 3 leaves the set.
    assert gen.concept_row(_StubJudge(), "style", "striped", runs, plain, erased=("dotted",))["paired_change"] == 0.0
    # solid (0) with it: implicit 3 and the second empty seed are left; implicit 3 changed
    assert gen.concept_row(_StubJudge(), "style", "striped", runs, plain, erased=("solid",))["paired_change"] == 0.5
    # the intervals come from the same counts: named 1 of 4 (Wilson), rest 1 of 2 right, paired 1 of 4 changed
    from diffusion_sae.eval.metrics import wilson_interval
    assert row["ci"]["named"] == pytest.approx(list(wilson_interval(1, 4)))
    assert row["ci"]["rest_accuracy"] == pytest.approx(list(wilson_interval(1, 2)))
    assert row["ci"]["paired_change"] == pytest.approx(list(wilson_interval(1, 4)))
    assert row["ci"]["implicit_rel"] == [0.0, 0.0]      # the edit left striped on none of the 6 seeds
    s = gen.summarize([row, dict(row, concept="dotted", named=0.5)])
    assert s["named"] == {"value": 0.5, "concept": "dotted"}
    assert s["implicit_rel"]["value"] == 0.0


class _StubJudge:
    """features() of rendered images for the FD reference: a fixed random projection."""

    def __init__(self):
        self.w = torch.randn(3 * 32 * 32, 8, generator=torch.Generator().manual_seed(1))
        self.training = False

    def features(self, images):
        return images.flatten(1) @ self.w

    def eval(self):
        return self

    def train(self, mode=True):
        return self


def test_rest_prompts_avoid_every_concept_erased_together():
    rest = gen.rest_prompts("style", "solid", 30, erased=("striped", "dotted"))
    assert not {STYLES.index(c) for c in ("solid", "striped", "dotted")} & set(rest.styles)


def test_several_concepts_at_once_and_one_after_another():
    """Both shipped methods removing two styles together, at once and stacked: every concept of the group
    gets its own row; Concept Steerers removes each named concept (the judge's verdict) while prompts naming
    a third style stay right, and the group's rest prompts never name a concept it erases."""
    from diffusion_sae.world import assets, bundle

    pipe, clf = assets.load_pipeline(), assets.load_classifier()
    blocks = {"style": bundle.load_blocks("style", bundle.load_params()["saeuron"]["solid"]["blocks"])}
    methods = gen.group_methods(pipe, bundle.load_text_sae(), blocks, bundle.load_params(), size=2)
    assert set(methods) == {f"{m} (shipped, 2 {how})" for m in ("Concept Steerers", "SAeUron")
                            for how in ("at once", "one after another")}
    methods = {k: v for k, v in methods.items() if k.startswith("Concept Steerers") or "at once" in k}
    cfg = gen.GeneralizationConfig(only={"style": ("solid", "striped")}, kinds=("style",), named=4, implicit=2,
                                   empty=2, rest=4, batch_size=64)
    res = gen.run_generalization(pipe, clf, methods, cfg)
    for name, rows in res["rows"].items():
        assert [r["concept"] for r in rows] == ["solid", "striped"], name
    for r in res["rows"]["Concept Steerers (shipped, 2 at once)"] + res["rows"]["Concept Steerers (shipped, 2 one after another)"]:
        assert r["named_plain"] >= 0.75 and r["named"] <= 0.25, r
        assert r["rest_accuracy"] >= 0.75, r


def test_concepts_with_their_own_probe_step_removed_at_once():
    """The first three objects read their probes at different steps (a concept's own "step"): one context cannot
    hold such gates (one verdict per sample picks one encoding), so the group removal at once reads every probe at
    the kind's step, and entering it does not raise; stacked, each keeps its own step."""
    from diffusion_sae.eval.shapes import removal_steering, steer_strength
    from diffusion_sae.interventions.steer import SteeringError, steer_text_encoder
    from diffusion_sae.world import assets, bundle

    pipe, sae, params = assets.load_pipeline(), bundle.load_text_sae(), bundle.load_params()
    cs, objects = params["steer"], bundle.KINDS["object"][:3]
    # the shipped presets may come to agree on a step: give the second its own, unlike the first's
    first = cs["family_concepts"]["object"].get(objects[0], {}).get("step", cs["family_detector"]["object"]["step"])
    cs["family_concepts"]["object"][objects[1]] = {"step": 11 if first != 11 else 19, "threshold": 0.2}
    own = [removal_steering(sae, pipe, "object", c, steer_strength(cs, "object", c), cs).rows for c in objects]
    assert len({g.detectors[0].step for g in own}) > 1
    with pytest.raises(SteeringError, match="same step"):
        with steer_text_encoder(pipe, [removal_steering(sae, pipe, "object", c, -1.0, cs) for c in objects]):
            pass
    # at once no gate steers its rivals' prompts (the verdict is shared); one after another each keeps its own scale
    for c in objects:
        at_once = gen.group_member_steering(sae, pipe, cs, "object", c, at_once=True).rows
        alone = gen.group_member_steering(sae, pipe, cs, "object", c, at_once=False).rows
        want = cs["family_concepts"]["object"].get(c, {}).get("rival", cs.get("family_rival", {}).get("object", 0.0))
        assert (at_once.rival_late, alone.rival_late) == (0.0, float(want))
        assert at_once.detectors[0].step == cs["family_detector"]["object"]["step"]
    assert any(gen.group_member_steering(sae, pipe, cs, "object", c, at_once=False).rows.rival_late for c in objects)
    methods = gen.group_methods(pipe, sae, {}, params, size=3)
    with methods["Concept Steerers (shipped, 3 at once)"]["object"](objects[0])():
        pass
    with methods["Concept Steerers (shipped, 3 one after another)"]["object"](objects[0])():
        pass


def test_mean_violation_by_hand():
    """0 when every bar holds; a named presence of 10 % is one bar (5 %) past it; Concept Steerers' paired change
    carries no bar (its text edit touches every sample), SAeUron's does (5 %: 20 % is 3 bars past)."""
    ok = {"named": 0.0, "held_out": 0.0, "implicit_all": 0.0, "implicit_all_plain": 0.5, "rest_accuracy": 1.0,
          "paired_change": 0.2, "tv_other": 0.0, "fd_ratio": 0.0}
    res = {"rows": {"Concept Steerers (x)": [ok, dict(ok, named=0.10)], "SAeUron (x)": [ok]}}
    v = gen.mean_violations(res)
    assert v["Concept Steerers (x)"] == pytest.approx(0.5) and v["SAeUron (x)"] == pytest.approx(3.0)


def test_wilson_interval_matches_scipy_and_paired_ratio_interval_by_resampling():
    """Wilson against scipy's own; the implicit ratio's bootstrap covers its point estimate, narrows with 4x the
    seeds, is fixed by its seed, and has no ratio where the plain model never drew the concept."""
    from scipy.stats import binomtest

    from diffusion_sae.eval.metrics import paired_ratio_interval, wilson_interval

    for k, n in ((0, 20), (1, 20), (3, 20), (20, 20), (9, 128), (64, 128)):
        ref = binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ref.low, ref.high), abs=1e-9), (k, n)
    for bad in ((3, 2), (-1, 4), (1, 0), (0.5, 4), (True, 4)):
        with pytest.raises(MetricInputError):
            wilson_interval(*bad)
    g = torch.Generator().manual_seed(0)
    plain = (torch.rand(128, generator=g) < 0.15).tolist()
    edited = [p and bool(torch.rand(1, generator=g) < 0.4) for p in plain]
    est = sum(edited) / sum(plain)
    lo, hi = paired_ratio_interval(edited, plain)
    assert lo < est < hi and 0.0 <= lo and hi <= 1.0
    assert paired_ratio_interval(edited, plain) == (lo, hi)
    lo4, hi4 = paired_ratio_interval(edited * 4, plain * 4)
    assert hi4 - lo4 < 0.7 * (hi - lo)
    assert all(v != v for v in paired_ratio_interval([True, False], [False, False]))
    with pytest.raises(MetricInputError):
        paired_ratio_interval([True], [True, False])


def test_noise_verdicts_tell_a_miss_the_counts_can_resolve_from_one_they_cannot():
    """3 of 20 named images is past the 5 % bar beyond noise (Wilson low end 5.2 %), 2 of 20 is not (2.8 %); a
    rest accuracy of 18 of 20 is within noise of 95 %, 17 of 20 is not (high end 94.8 %); FD has no interval; a held bar is
    not listed; Concept Steerers' paired change has no bar."""
    from diffusion_sae.eval.metrics import wilson_interval

    ok = {"kind": "object", "named": 0.0, "held_out": 0.0, "implicit_all": 0.0, "implicit_all_plain": 0.5,
          "rest_accuracy": 1.0, "paired_change": 0.0, "tv_other": 0.0, "fd_ratio": 0.0, "ci": {}}
    rows = [dict(ok, concept="a", named=0.15, ci={"named": list(wilson_interval(3, 20))}),
            dict(ok, concept="b", named=0.10, ci={"named": list(wilson_interval(2, 20))}),
            dict(ok, concept="c", rest_accuracy=0.90, ci={"rest_accuracy": list(wilson_interval(18, 20))}),
            dict(ok, concept="d", rest_accuracy=0.85, ci={"rest_accuracy": list(wilson_interval(17, 20))}),
            dict(ok, concept="e", fd_ratio=0.5, paired_change=0.5)]
    got = {(m[:3], c, axis): verdict for m, c, axis, v, lohi, bar, verdict in
           gen.noise_verdicts({"rows": {"SAeUron (x)": rows, "Concept Steerers (x)": rows[4:]}})}
    assert got == {("SAe", "object: a", "named"): "beyond noise", ("SAe", "object: b", "named"): "within noise",
                   ("SAe", "object: c", "rest_accuracy"): "within noise",
                   ("SAe", "object: d", "rest_accuracy"): "beyond noise",
                   ("SAe", "object: e", "fd_ratio"): "no interval", ("SAe", "object: e", "paired_change"): "no interval",
                   ("Con", "object: e", "fd_ratio"): "no interval"}


def test_embedding_match_finds_held_out_names_on_the_bundled_model():
    """The shipped FamilyGate finds a concept's held-out names (never used to build it) by the text encoder's token
    embeddings: at least 46 of the 48 aliases make their prompt count as naming the concept, and an alias of a
    rival as naming a rival; exact token matching finds none of them."""
    from diffusion_sae.eval.shapes import family_removal
    from diffusion_sae.world import assets, bundle
    from diffusion_sae.world.config import ALIASES, eval_prompt

    pipe, sae = assets.load_pipeline(), bundle.load_text_sae()
    base = {"object": "ring", "style": "solid", "colour": "red"}
    found = rival_found = token_found = total = 0
    for kind, concepts in bundle.KINDS.items():
        for concept in concepts:
            gates = {m: family_removal(sae, pipe, kind, concept, -1.0, 0.1, match=m).rows for m in ("embedding", "tokens")}
            rival = next(c for c in concepts if c != concept and c != base[kind])
            def say(name):
                a = dict(base, **{kind: name})
                return eval_prompt(a["object"], a["style"], a["colour"])
            prompts, rival_prompts = [say(a) for a in ALIASES[concept]], [say(a) for a in ALIASES[rival]]
            ids = pipe.tokenizer(prompts + rival_prompts, padding="max_length",
                                 max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
            emb, tok = gates["embedding"].matcher(ids), gates["tokens"].matcher(ids)
            found += sum(x == "target" for x in emb[:2])
            rival_found += sum(x == "rival" for x in emb[2:])
            token_found += sum(x == "target" for x in tok[:2])
            total += 2
    assert total == 48 and found >= 46 and rival_found >= 46 and token_found == 0


def test_family_first_step_reaches_the_gate_from_params_and_candidates():
    """params["steer"]["family_from_step"] ({kind: step}) reaches the FamilyGate of removal_steering; a kind it
    does not list keeps the implicit fraction at every step (0); the shipped params (family, family_from_step,
    family_detector, family_concepts, whatever their values) reach the gate of every concept they list. A 5th element of a
    family_candidates setting is the same step."""
    from diffusion_sae.eval.shapes import removal_steering, steer_strength
    from diffusion_sae.world import assets, bundle, robust_tune

    pipe, sae = assets.load_pipeline(), bundle.load_text_sae()
    style, obj = bundle.KINDS["style"][0], bundle.KINDS["object"][0]
    cs = {"family": {"style": 0.2, "object": 0.1}, "family_from_step": {"style": 8}, "match": "tokens"}
    st = removal_steering(sae, pipe, "style", style, -1.0, cs)
    assert st.rows.implicit_from_step == 8 and st.meta["family_gate"]["implicit_from_step"] == 8
    assert removal_steering(sae, pipe, "object", obj, -1.0, cs).rows.implicit_from_step == 0
    from diffusion_sae.concepts.probe import ConceptDetector

    shipped = bundle.load_params()["steer"]
    assert shipped["family"]
    for kind, imp in shipped["family"].items():
        for c in bundle.KINDS[kind]:
            own = shipped.get("family_concepts", {}).get(kind, {}).get(c, {})
            gate = removal_steering(sae, pipe, kind, c, steer_strength(shipped, kind, c), shipped).rows
            assert gate.implicit == float(own.get("implicit", imp))
            assert gate.implicit_from_step == (int(own["step"]) + 1 if "step" in own
                                               else int(shipped.get("family_from_step", {}).get(kind, 0)))
            det = shipped.get("family_detector", {}).get(kind)
            if det is None:
                assert gate.detector is None
            else:
                specs = det if isinstance(det, list) else [det]
                assert len(gate.detectors) == len(specs)
                for d, spec in zip(gate.detectors, specs):
                    assert isinstance(d, ConceptDetector) and d.concept == c
                    branch = spec.get("branch", "uncond")
                    step = int(own["step"]) if "step" in own and branch == "uncond" else int(spec["step"])
                    assert (d.step, d.threshold, d.branch) == (step, float(own.get("threshold", spec["threshold"])),
                                                               branch)
    # family_concepts: one concept's own implicit fraction and probe threshold, no other concept's
    cs = {"family": {"object": 2.0}, "family_from_step": {"object": 12},
          "family_detector": {"object": {"step": 11, "threshold": 0.2}},
          "family_concepts": {"object": {obj: {"implicit": 3.0, "threshold": 0.1}}}}
    first = removal_steering(sae, pipe, "object", obj, -1.0, cs).rows
    second = removal_steering(sae, pipe, "object", bundle.KINDS["object"][1], -1.0, cs).rows
    assert (first.implicit, first.detectors[0].threshold, first.detectors[0].step) == (3.0, 0.1, 11)
    assert (second.implicit, second.detectors[0].threshold) == (2.0, 0.2)
    assert first.implicit_from_step == second.implicit_from_step == 12
    # its own probe step: the image-side probe read there, the fraction from the next step, a rewind still below it
    late = dict(cs, family_concepts={"object": {obj: {"step": 19}}}, family_rewind={"object": {obj: 0}})
    first = removal_steering(sae, pipe, "object", obj, -1.0, late).rows
    second = removal_steering(sae, pipe, "object", bundle.KINDS["object"][1], -1.0, late).rows
    assert (first.detectors[0].step, first.implicit_from_step, first.rewind, first.rewind_from_step) == (19, 20, True, 0)
    assert (second.detectors[0].step, second.implicit_from_step, second.rewind) == (11, 12, False)
    # family_rival (kind) and its per-concept "rival": the scale on flagged prompts read as a rival's; none without a
    # detector
    rival = dict(cs, family_rival={"object": 2.0}, family_concepts={"object": {obj: {"rival": 4.0}}})
    first = removal_steering(sae, pipe, "object", obj, -1.0, rival).rows
    second = removal_steering(sae, pipe, "object", bundle.KINDS["object"][1], -1.0, rival).rows
    assert (first.rival_late, second.rival_late) == (4.0, 2.0)
    assert removal_steering(sae, pipe, "object", obj, -1.0, cs).rows.rival_late == 0.0
    blind = {k: v for k, v in rival.items() if k != "family_detector"}
    assert removal_steering(sae, pipe, "object", obj, -1.0, blind).rows.rival_late == 0.0
    for c in bundle.KINDS["object"]:
        own = shipped.get("family_concepts", {}).get("object", {}).get(c, {})
        gate = removal_steering(sae, pipe, "object", c, steer_strength(shipped, "object", c), shipped).rows
        assert gate.rival_late == float(own.get("rival", shipped.get("family_rival", {}).get("object", 0.0)))
    for bad, match in (({"implicit": -1}, "implicit must be"), ({"threshold": 1.5}, "threshold must be"),
                       ({"rival": -2}, "rival must be"),
                       ({"threshold": True}, "threshold must be"), ({"fraction": 2}, "unknown key"),
                       ({"step": 13}, "step must be one of"), ({"step": True}, "step must be one of")):
        with pytest.raises(ValueError, match=match):
            removal_steering(sae, pipe, "object", obj, -1.0, dict(cs, family_concepts={"object": {obj: bad}}))
    # family_rewind: a step for every concept of the kind, or {concept: step} for some; every shipped entry reaches
    # its concept's gate and no other concept's
    det = {"step": 11, "threshold": 0.2}
    for entry, other in ((3, 3), ({obj: 5}, None)):
        cs = {"family": {"object": 2.0}, "family_from_step": {"object": 12}, "family_detector": {"object": det},
              "family_rewind": {"object": entry}}
        first = removal_steering(sae, pipe, "object", obj, -1.0, cs).rows
        second = removal_steering(sae, pipe, "object", bundle.KINDS["object"][1], -1.0, cs).rows
        assert first.rewind and first.rewind_from_step == (entry if other else 5)
        assert second.rewind == (other is not None) and second.rewind_from_step == (other or 0)
    with pytest.raises(ValueError, match="family_rewind of object"):
        removal_steering(sae, pipe, "object", obj, -1.0, dict(cs, family_rewind={"object": True}))
    for kind, entry in shipped.get("family_rewind", {}).items():
        for c in bundle.KINDS[kind]:
            gate = removal_steering(sae, pipe, kind, c, steer_strength(shipped, kind, c), shipped).rows
            want = entry.get(c) if isinstance(entry, dict) else entry
            assert gate.rewind == (want is not None) and gate.rewind_from_step == (want or 0)
    cands = robust_tune.family_candidates(pipe, sae, [(-1.0, 0.2), (-1.0, 0.2, None, "tokens", 8)], kinds=("style",))
    assert list(cands) == ["CS family gate (tokens) λ=-1 implicit×0.2",
                           "CS family gate (tokens) λ=-1 implicit×0.2 from step 8"]


def test_saeuron_preset_detectors_resolve_to_the_shipped_probes():
    """A SAeUron preset's "detector" ([step, p], [step, p, branch] or a list of them) gives the kind's shipped
    probes of that branch and step as one detector or a tuple (any of them gates); every shipped preset's
    detector resolves."""
    from diffusion_sae.concepts.probe import ConceptDetector, ProbeError
    from diffusion_sae.eval.shapes import _shipped_detector
    from diffusion_sae.world import bundle

    one = _shipped_detector("striped", [9, 0.2], bundle.load_probe)
    assert isinstance(one, ConceptDetector) and (one.step, one.threshold, one.branch) == (9, 0.2, "uncond")
    two = _shipped_detector("circle", [[0, 0.5, "cond"], [5, 0.2]], bundle.load_probe)
    assert isinstance(two, tuple) and [(d.step, d.threshold, d.branch, d.concept) for d in two] == [
        (0, 0.5, "cond", "circle"), (5, 0.2, "uncond", "circle")]
    assert two[0].hookpoint == bundle.PROBE_HOOKPOINTS["object"]
    # a fourth entry "below" flags the complement: exactly the samples under the threshold
    below = _shipped_detector("gradient", [0, 0.5, "cond", "below"], bundle.load_probe)
    above = _shipped_detector("gradient", [0, 0.5, "cond"], bundle.load_probe)
    assert below.below and not above.below and "p < 0.5" in repr(below)
    probe = above.probe
    tokens = torch.randn(64, 4, probe.mean.shape[-1], generator=torch.Generator().manual_seed(0)) * 3
    p = probe.probabilities(tokens)[:, probe.index("gradient")]
    assert torch.equal(below(tokens), p < 0.5) and torch.equal(above(tokens), ~below(tokens))
    with pytest.raises(ProbeError, match="below"):
        probe.detector("gradient", 0.5, below="yes")
    with pytest.raises(ValueError, match="give \\[probe step, threshold"):
        _shipped_detector("gradient", [0, 0.5, "cond", "bleow"], bundle.load_probe)
    for concept, preset in bundle.load_params()["saeuron"].items():
        for p in (preset, *preset.get("extra_edits", [])):     # a concept's further edits resolve too
            if p.get("detector"):
                dets = _shipped_detector(concept, p["detector"], bundle.load_probe)
                assert all(d.concept == concept for d in (dets if isinstance(dets, tuple) else (dets,)))


def test_method_rows_splice_replaces_rows_and_refuses_attacked_ones(tmp_path):
    """benchmarks/method_rows.py --splice: a rerun row replaces the full run's row of the same method and concept,
    the method's summary and the report follow it, the report says what was spliced; a row whose concept was
    attacked in the full run is refused (the attack is not rerun), and nothing is written then."""
    import json
    import shutil
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from method_rows import splice

    src = Path(__file__).resolve().parents[1] / "docs" / "eval-generalization-full"
    for f in ("results.json", "report.json"):
        shutil.copy(src / f, tmp_path / f)
    res = json.loads((tmp_path / "results.json").read_text())
    rows = res["generalization"]["rows"]["SAeUron (shipped)"]
    row = dict(next(r for r in rows if r["concept"] == "noisy"), named=0.9)
    splice(tmp_path, {"rows": {"SAeUron (shipped)": [row]}}, "test change")
    after = json.loads((tmp_path / "results.json").read_text())["generalization"]
    assert next(r for r in after["rows"]["SAeUron (shipped)"] if r["concept"] == "noisy")["named"] == 0.9
    assert after["summary"]["SAeUron (shipped)"]["named"] == {"value": 0.9, "concept": "noisy"}
    assert after["rows"]["Concept Steerers (shipped)"] == res["generalization"]["rows"]["Concept Steerers (shipped)"]
    md = (tmp_path / "report.md").read_text()
    assert "SAeUron (shipped): noisy from a rerun" in md and "test change" in md
    before = (tmp_path / "results.json").read_text()
    attacked = dict(next(r for r in rows if r["concept"] == "dotted"))
    with pytest.raises(SystemExit, match="attacked"):
        splice(tmp_path, {"rows": {"SAeUron (shipped)": [attacked]}}, "x")
    assert (tmp_path / "results.json").read_text() == before
