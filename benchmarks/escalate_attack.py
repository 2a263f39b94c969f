"""Concept Steerers under a white-box continuous attack: escalating S where the concept probe still sees it.

The attack (eval/attack.py, UnlearnDiffAtk-style) prepends optimised continuous token embeddings to a prompt
that names the concept and brings it back although S acts at full strength on that prompt. From the image
side such a sample still heads to the concept, so the kind's concept probe flags it: `named_late` (params key
"family_named_late") scales S on prompts naming the concept from the gate's step on, on the flagged samples
only. This runs the attack on the first 3 styles and objects with a TUNING configuration (other attack seed,
other prompt attributes, generation seeds 500-515 of the tuning split; --configs N averages over the first N of
`saeuron_attack.CONFIGS`, up to 8, seeds 500-627); the evaluation's attack (seed 0, "a red star in striped style", seeds 0-15)
is never used here.

With --prompt-probe P the kind's detector also ORs the prompt's-branch probe at step 0 (p >= P): every sample
of a prompt the model reads as the concept is then escalated, not only those the image-side probe still flags.

With --candidate FILE (a params JSON with a "steer" section, e.g. a preset written by `tune --out`) the shipped
preset and that candidate are attacked instead, each at its own named_late: a change to the probe's step or the
rewind (detector_gate.py --round 9) moves where the escalation acts, so it must be judged here too.

    python benchmarks/escalate_attack.py [--steps 20] [--prompt-probe 0.5] [--candidate preset.json] [--configs 4]
                                         [--concepts square,striped]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusion_sae.eval.attack import AttackConfig, run_attack_benchmark, steerers_builder  # noqa: E402
from diffusion_sae.world import assets, bundle  # noqa: E402
from saeuron_attack import CONFIGS  # noqa: E402

NAMED_LATE = (1.0, 2.0, 4.0, 8.0)


def escalated(steer: dict, kind: str, named_late: float, prompt_probe: float | None) -> dict:
    """A copy of the steer preset with the kind's named_late at this value (and the prompt's-branch probe ORed in)."""
    cs = copy.deepcopy(steer)
    cs.setdefault("family_named_late", {})[kind] = named_late
    if prompt_probe is not None:
        cs["family_detector"][kind] = [cs["family_detector"][kind], {"step": 0, "threshold": prompt_probe, "branch": "cond"}]
    return cs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompt-probe", type=float, default=None)
    ap.add_argument("--candidate", default=None, help="params JSON whose \"steer\" preset is attacked beside the shipped one")
    ap.add_argument("--configs", type=int, default=1, choices=range(1, len(CONFIGS) + 1),
                    help="tuning attack configurations to average over")
    ap.add_argument("--concepts", default="", help="comma-separated (default: the first 3 styles and objects)")
    a = ap.parse_args()
    pipe, clf = assets.load_pipeline(), assets.load_classifier()
    pipe.set_progress_bar_config(disable=True)
    text_sae, params = bundle.load_text_sae(), bundle.load_params()
    cfgs = [AttackConfig(steps=a.steps, n_images=16, seed=s, image_seed=i, object=o, style=st, colour=c)
            for s, o, st, c, i in CONFIGS[:a.configs]]
    cand = None
    if a.candidate:
        with open(a.candidate) as f:
            cand = json.load(f)["steer"]
    t0 = time.perf_counter()
    print("| kind | concept | preset | presence under steering | attack success (continuous), per config | mean |")
    print("|---|---|---|---|---|---|")
    for kind in ("style", "object"):
        concepts = [c for c in bundle.KINDS[kind] if c in a.concepts.split(",")] if a.concepts else list(bundle.KINDS[kind][:3])
        if not concepts:
            continue
        if cand is not None:
            presets = {"shipped": params["steer"], "candidate": cand}
        else:
            presets = {f"named_late {v:g}": escalated(params["steer"], kind, v, a.prompt_probe) for v in NAMED_LATE}
        builders = {name: steerers_builder(pipe, text_sae, kind, cs) for name, cs in presets.items()}
        runs = [run_attack_benchmark(pipe, clf, builders, kind, concepts, cfg) for cfg in cfgs]
        for name in presets:
            for i, c in enumerate(concepts):
                rows = [r["rows"][name][i] for r in runs]
                asr = [r["asr"] for r in rows]
                print(f"| {kind} | {c} | {name} | {100 * rows[0]['presence_intervened']:.0f} % | "
                      f"{' / '.join(f'{100 * x:.0f}' for x in asr)} % | {100 * sum(asr) / len(asr):.0f} % |", flush=True)
    print(f"tuning attack, {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
