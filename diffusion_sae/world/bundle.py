"""The ShapesCanvas bundle: prompt sets, concept groups, and the shipped SAEs + concept dictionaries.

Shipped layout (`diffusion_sae/world/assets/saes/`):
  text_encoder.text_model.encoder.layers.2/   Concept Steerers' k-SAE (cfg.json, sae.safetensors)
  unet.up_blocks.1.attentions.1/              SAeUron's block SAE + concept_dictionary_{style,object,colour}.*
  unet.up_blocks.1.attentions.0/              the same for the block before it (ShapesCanvas spreads a
                                              style over both; see the world README)
  probes/{kind}-step{s}/                      concept probes (concepts/probe.py) of each kind at step s,
                                              the image-side detectors of Concept Steerers' FamilyGate
"""
from __future__ import annotations

import torch

from .config import COLOUR_NAMES, GUIDANCE, OBJECTS, STEPS, STYLES, eval_prompt  # noqa: F401  (re-exported: bundle.GUIDANCE)
from .data import make_captions, sample_concepts
from .splits import check_tuning

TEXT_LAYER = 2
TEXT_HOOKPOINT = f"text_encoder.text_model.encoder.layers.{TEXT_LAYER}"
BLOCK_HOOKPOINT = "unet.up_blocks.1.attentions.1"
# Every block with a shipped SAE, the paper's SD 1.x block first; per-concept presets name the ones
# their edit uses. Block outputs only (world v2): an edit of a cross-attention layer's own output
# (`CROSS_ATTN`, what the text writes into the image tokens) acts only when the prompt names the concept
# (a prompt filter, measured in world v1); the down_blocks.1 SAE was never picked by any tuning.
CROSS_ATTN = "{}.transformer_blocks.0.attn2"
BLOCK_HOOKPOINTS = (BLOCK_HOOKPOINT, "unet.up_blocks.1.attentions.0", "unet.up_blocks.0.attentions.1",
                    "unet.up_blocks.0.attentions.0", "unet.mid_block.attentions.0", "unet.down_blocks.2.attentions.0")
KINDS = {"style": STYLES, "object": OBJECTS, "colour": COLOUR_NAMES}
# The block each kind's concept probe reads (the unconditional branch, patch mean); the steps shipped.
PROBE_HOOKPOINTS = {"style": "unet.up_blocks.1.attentions.0", "object": "unet.up_blocks.0.attentions.1",
                    "colour": "unet.up_blocks.1.attentions.0"}
PROBE_STEPS = (5, 7, 9, 11, 15, 19)
# probes of the conditional (prompt) branch: what a prompt asks for is readable from the first step on
COND_PROBE_STEPS = (0, 1)
PROBE_PROMPTS = 32      # named prompts per concept a probe is fitted on (tuning seeds)


def training_captions(n: int, seed: int = 0, p_partial: float = 0.3) -> tuple[list[str], list[int]]:
    """n captions from the training distribution and one seed each (for SAE activation collection)."""
    g = torch.Generator().manual_seed(10_007 + seed)
    o, s, c = sample_concepts(n, g)
    caps = make_captions(o, s, c, g, p_partial=p_partial)
    return caps, [seed * 1_000_000 + i for i in range(n)]


def concept_prompts(kind: str, per_concept: int = 20, seed: int = 0) -> dict[str, list[str]]:
    """For every concept of a kind, prompts that name it with the other attributes varied."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    g = torch.Generator().manual_seed(7_919 + seed)
    out: dict[str, list[str]] = {}
    for concept in KINDS[kind]:
        prompts = []
        for i in range(per_concept):
            o = OBJECTS[int(torch.randint(len(OBJECTS), (1,), generator=g))]
            s = STYLES[int(torch.randint(len(STYLES), (1,), generator=g))]
            c = COLOUR_NAMES[int(torch.randint(len(COLOUR_NAMES), (1,), generator=g))]
            o, s, c = (concept if kind == "object" else o, concept if kind == "style" else s,
                       concept if kind == "colour" else c)
            prompts.append(eval_prompt(o, s, c))
        out[concept] = prompts
    check_tuning(prompts=[p for ps in out.values() for p in ps], where=f"{kind} dictionary prompts")
    return out


def dictionary_name(kind: str) -> str:
    return f"concept_dictionary_{kind}"


def load_text_sae(folder=None):
    from ..sae import TopKSAE
    from .assets import sae_dir

    return TopKSAE.from_pretrained(folder or sae_dir() / TEXT_HOOKPOINT)


def load_block_sae(folder=None, hookpoint: str = BLOCK_HOOKPOINT):
    from ..sae import TopKSAE
    from .assets import sae_dir

    return TopKSAE.from_pretrained(folder or sae_dir() / hookpoint)


def load_dictionary(kind: str, folder=None, hookpoint: str = BLOCK_HOOKPOINT):
    from ..concepts.dictionary import ConceptDictionary
    from .assets import sae_dir

    return ConceptDictionary.load(folder or sae_dir() / hookpoint, name=dictionary_name(kind))


def load_blocks(kind: str, hookpoints=BLOCK_HOOKPOINTS) -> dict:
    """{hookpoint: (block SAE, concept dictionary of `kind`)} for the shipped blocks."""
    return {h: (load_block_sae(hookpoint=h), load_dictionary(kind, hookpoint=h)) for h in hookpoints}


# "baseline": "" subtracts the empty prompt's steering matrix (our option; the paper has none).
DEFAULT_PARAMS = {"steer": {"style": -1.0, "object": -1.0, "colour": -1.0, "add_style": 1.0, "baseline": ""},
                  "saeuron": {}, "saeuron_multi": {}}


def params_path():
    from .assets import sae_dir

    return sae_dir() / "params.json"


def load_params(path=None) -> dict:
    """Tuned strengths: {"steer": {kind: λ, "add_style": λ, …}, "saeuron": {concept: {top_n, multiplier, …}},
    "saeuron_multi": {settings for several concepts at once}}."""
    import json
    from pathlib import Path

    p = Path(path or params_path())
    params = json.loads(json.dumps(DEFAULT_PARAMS))
    if p.exists():
        got = json.loads(p.read_text())
        for k in params:
            params[k].update(got.get(k, {}))
    return params


def save_params(params: dict, path=None) -> None:
    import json
    import os
    from pathlib import Path

    p = Path(path or params_path())
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(params, indent=1))
    os.replace(tmp, p)


def probe_dir(kind: str, step: int, root=None, branch: str = "uncond"):
    from pathlib import Path

    from .assets import sae_dir

    tag = "" if branch == "uncond" else f"-{branch}"
    return Path(root or sae_dir()) / "probes" / f"{kind}{tag}-step{step}"


def load_probe(kind: str, step: int, root=None, branch: str = "uncond"):
    """The shipped concept probe of a kind at a denoising step (bundle.PROBE_STEPS; COND_PROBE_STEPS for
    branch="cond")."""
    from ..concepts.probe import ConceptProbe

    return ConceptProbe.from_pretrained(probe_dir(kind, step, root, branch))


def fit_probes(pipe, kind: str, steps=PROBE_STEPS, per_concept: int = PROBE_PROMPTS, seed: int = 0,
               guidance: float = GUIDANCE, sampler_steps: int = STEPS, branch: str = "uncond") -> list:
    """Concept probes of a kind at each step, fitted on prompts naming each concept (`concept_prompts`)
    at tuning seeds, one seed per prompt: nothing of the evaluation split is seen."""
    from ..concepts.probe import fit_concept_probe
    from .splits import TUNING_SEEDS

    groups = concept_prompts(kind, per_concept, seed=seed)
    n = sum(len(v) for v in groups.values())
    seeds = [TUNING_SEEDS.start + i % len(TUNING_SEEDS) for i in range(n)]
    check_tuning(seeds, where=f"{kind} probe seeds")
    return fit_concept_probe(pipe, PROBE_HOOKPOINTS[kind], groups, list(steps), seeds=seeds, steps=sampler_steps,
                             guidance=guidance, batch_size=64, branch=branch)

