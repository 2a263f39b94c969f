"""SAeUron's shipped presets under the white-box continuous attack, with an earlier image-side probe.

A preset behind the prompt's-branch gate edits every sample of a prompt the model reads as the concept; the
attack (eval/attack.py, UnlearnDiffAtk-style) optimises prepended token embeddings until the prompt brings the
concept back, which also drives the prompt's-branch probe below its threshold. What is left is the image-side
probe: the earlier its step, the more of the image the edit still reaches. This runs the attack on the first 3
styles and objects under up to eight TUNING attack configurations (`CONFIGS`: attack seeds 1-8, other prompt
attributes, generation seeds 500-627 of the tuning split; the first is `escalate_attack.py`'s); the evaluation's
attack (seed 0, "a red star in striped style", seeds 0-15) is never used here. Each variant changes only the
image-side probe's step (and, with "γ×1.5", the edit's strength); the collateral of the same variants is
measured by `saeuron_detector.py` (rounds 1-9).

    python benchmarks/saeuron_attack.py [--steps 20] [--configs 4] [--variants "shipped,image probe 5"] [--concepts dotted,circle]
                                        [--candidate dotted-preset.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusion_sae.eval.attack import AttackConfig, run_attack_benchmark  # noqa: E402
from diffusion_sae.eval.shapes import saeuron_context  # noqa: E402
from diffusion_sae.world import assets, bundle  # noqa: E402
from saeuron_detector import split_detectors  # noqa: E402


def with_image_probe(p: dict, step: int | None, gamma: float = 1.0, rewind: bool | None = None) -> dict:
    """Preset p with its image-side probe(s) at `step` (None: unchanged); the prompt's-branch gate is kept;
    rewind True / False sets the preset's "rewind" (None: as shipped)."""
    q = dict(p, multiplier=p.get("multiplier", -1.0) * gamma)
    if rewind is not None:
        q["rewind"] = rewind
    if step is None or not p.get("detector"):
        return q
    cond, image = split_detectors(p["detector"])
    q["detector"] = cond + ([[step, d[1]] for d in image] or [[step, 0.2]])
    return q


VARIANTS = {"shipped": (None, 1.0), "image probe 5": (5, 1.0), "image probe 5, γ×1.5": (5, 1.5), "image probe 7": (7, 1.0),
            "image probe 9": (9, 1.0), "image probe 11": (11, 1.0), "image probe 19 + rewind": (19, 1.0, True)}

# Tuning attack configurations: (attack seed, object, style, colour, first generation seed). One attack's success
# hangs on its seed and prompt (16 images): --configs N averages over the first N.
CONFIGS = ((1, "heart", "wavy", "blue", 500), (2, "arrow", "noisy", "green", 516), (3, "ring", "gradient", "orange", 532),
           (4, "diamond", "checkered", "purple", 548),
           # 5-8: four more (other attributes, seeds 564-627), for presets whose success swings between the first four
           (5, "cross", "outlined", "yellow", 564), (6, "crescent", "noisy", "red", 580), (7, "heart", "checkered", "green", 596),
           (8, "ring", "wavy", "purple", 612))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--concepts", default="", help="comma-separated (default: the first 3 styles and objects)")
    ap.add_argument("--configs", type=int, default=1, choices=range(1, len(CONFIGS) + 1),
                    help="tuning attack configurations to average over")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants")
    ap.add_argument("--candidate", action="append", default=[], metavar="FILE",
                    help="a JSON {concept: preset} (e.g. a SAeUron section of params.json, or part of it) attacked as a "
                         "variant named after the file; concepts it does not list keep the shipped preset")
    a = ap.parse_args()
    pipe, clf = assets.load_pipeline(), assets.load_classifier()
    pipe.set_progress_bar_config(disable=True)
    shipped = bundle.load_params()["saeuron"]
    cfgs = [AttackConfig(steps=a.steps, n_images=16, seed=s, image_seed=i, object=o, style=st, colour=c)
            for s, o, st, c, i in CONFIGS[:a.configs]]
    variants = {v: VARIANTS[v] for v in a.variants.split(",") if v}
    candidates = {}
    for path in a.candidate:
        with open(path) as f:
            candidates[os.path.splitext(os.path.basename(path))[0]] = json.load(f)
    t0 = time.perf_counter()
    print("| kind | concept | variant | detector | presence under the edit | attack success (continuous), per config | mean |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("style", "object"):
        blocks = bundle.load_blocks(kind)
        concepts = [c for c in bundle.KINDS[kind] if c in a.concepts.split(",")] if a.concepts else list(bundle.KINDS[kind][:3])
        if not concepts:
            continue

        def preset(name, concept):
            if name in candidates:
                return candidates[name].get(concept, shipped[concept])
            return with_image_probe(shipped[concept], *variants[name])

        def builder(name):
            def build(concept):
                pc = {concept: preset(name, concept)}
                return lambda: saeuron_context(pipe, blocks, pc)
            return build

        names = list(variants) + list(candidates)
        runs = [run_attack_benchmark(pipe, clf, {v: builder(v) for v in names}, kind, concepts, cfg) for cfg in cfgs]
        for name in names:
            for i, c in enumerate(concepts):
                rows = [r["rows"][name][i] for r in runs]
                det = preset(name, c)["detector"]
                asr = [r["asr"] for r in rows]
                print(f"| {kind} | {c} | {name} | {det} | {100 * rows[0]['presence_intervened']:.0f} % | "
                      f"{' / '.join(f'{100 * x:.0f}' for x in asr)} % | {100 * sum(asr) / len(asr):.0f} % |", flush=True)
    print(f"tuning attack, {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
