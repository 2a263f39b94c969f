"""Concept Steerers' family gate on prompts it reads as naming a rival: steer the samples the probe flags?

The shipped gate scales S by 0 on a prompt whose family word is nearest a rival's (the user asked for something
else), whatever the image does. When the matcher misreads an unfamiliar name for the concept as a rival's word,
that prompt is never steered at all. `FamilyGate.rival_late` (params "family_rival" {kind: scale}) gives such
prompts the scale from the gate's step on, on the samples the image-side probe flags (with the concept's rewind
where it has one); unflagged ones stay bit for bit plain.

Measured on the tuning split (seeds 500-999, canonical names), per concept:
- the concept's own named prompts with the gate misreading its word as a rival's (a stand-in for a name the matcher
  does not know; without rival_late they are plain images): presence of the concept;
- prompts naming a rival (what the gate protects): accuracy (every judged attribute the prompt's) and the share of
  seeds whose judged labels change from the plain image.

    python benchmarks/rival_gate.py [--kinds colour,style,object] [--named 16] [--rest 20] [--scales family,4]
"""
from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


from diffusion_sae.eval.metrics import paired_change_rate  # noqa: E402
from diffusion_sae.eval.shapes import ShapesBench, removal_steering, steer_strength  # noqa: E402
from diffusion_sae.interventions.steer import steer_text_encoder  # noqa: E402
from diffusion_sae.world import assets, bundle  # noqa: E402
from diffusion_sae.world.bundle import KINDS  # noqa: E402
from diffusion_sae.world.generalization import _all_correct, named_prompts, rest_prompts  # noqa: E402


class Misread:
    """The gate's matcher with the concept's own word read as a rival's."""

    def __init__(self, matcher):
        self.matcher = matcher

    def __call__(self, tok):
        return ["rival" if label == "target" else label for label in self.matcher(tok)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="colour,style,object")
    ap.add_argument("--named", type=int, default=16, help="named prompts per concept (read as a rival's)")
    ap.add_argument("--rest", type=int, default=20, help="prompts per concept naming a rival")
    ap.add_argument("--scales", default="family,4", help="rival_late candidates: numbers, or 'family' (the kind's "
                    "implicit fraction)")
    a = ap.parse_args()
    pipe, clf = assets.load_pipeline(), assets.load_classifier()
    pipe.set_progress_bar_config(disable=True)
    text_sae, shipped = bundle.load_text_sae(), bundle.load_params()["steer"]
    bench = ShapesBench(pipe, clf, batch_size=64)
    t0 = time.perf_counter()
    print("| concept | scale | named, read as a rival: present (plain) | rival prompts: accuracy (plain) | "
          "rival prompts: paired change |")
    print("|---|---|---|---|---|")
    totals = {}
    for kind in a.kinds.split(","):
        scales = list(dict.fromkeys(float(shipped["family"][kind]) if s == "family" else float(s)
                                    for s in a.scales.split(",")))   # colours: the family fraction is 4 already
        for concept in KINDS[kind]:
            ci = KINDS[kind].index(concept)
            named = named_prompts(kind, concept, a.named, split="tuning")
            rest = rest_prompts(kind, concept, a.rest, split="tuning")
            plain_named, plain_rest = bench.run(named), bench.run(rest)
            for x in scales:
                cs = copy.deepcopy(shipped)
                cs.setdefault("family_rival", {})[kind] = x
                cs.get("family_concepts", {}).get(kind, {}).get(concept, {}).pop("rival", None)  # the kind's x for all
                st = removal_steering(text_sae, pipe, kind, concept, steer_strength(cs, kind, concept), cs)
                rest_run = bench.run(rest, lambda st=st: steer_text_encoder(pipe, st))
                st.rows.matcher = Misread(st.rows.matcher)
                named_run = bench.run(named, lambda st=st: steer_text_encoder(pipe, st))
                present = float((named_run.pred[kind] == ci).float().mean())
                present_plain = float((plain_named.pred[kind] == ci).float().mean())
                acc, acc_plain = _all_correct(rest_run), _all_correct(plain_rest)
                change = paired_change_rate({k: v.tolist() for k, v in plain_rest.pred.items()},
                                            {k: v.tolist() for k, v in rest_run.pred.items()},
                                            [True] * len(rest.prompts))
                t = totals.setdefault((kind, x), [0, 0.0, 0.0, 0.0, 0.0, 0.0])
                for i, v in enumerate((1, present, present_plain, acc, acc_plain, change)):
                    t[i] += v
                print(f"| {kind}: {concept} | {x:g} | {100 * present:.0f} % ({100 * present_plain:.0f} %) | "
                      f"{100 * acc:.0f} % ({100 * acc_plain:.0f} %) | {100 * change:.0f} % |", flush=True)
    print(f"\nmeans per kind (tuning split, {time.perf_counter() - t0:.0f} s)")
    print("| kind | scale | named, read as a rival: present (plain) | rival prompts: accuracy (plain) | paired change |")
    print("|---|---|---|---|---|")
    for (kind, x), (n, p, pp, acc, accp, ch) in totals.items():
        print(f"| {kind} | {x:g} | {100 * p / n:.0f} % ({100 * pp / n:.0f} %) | {100 * acc / n:.0f} % "
              f"({100 * accp / n:.0f} %) | {100 * ch / n:.0f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
