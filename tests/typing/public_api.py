"""Type-checked use of the public API (`import diffusion_sae as ds`), the README's way: mypy checks this
file against the library's signatures (make test; tests/test_typing.py). Never run, only checked."""
from __future__ import annotations

from pathlib import Path

import torch

import diffusion_sae as ds


def public_api(pipe: object, sae_folder: Path) -> list[str]:
    sae: ds.TopKSAE = ds.load_sae(str(sae_folder), hookpoint="unet.up_blocks.1.attentions.1")
    width: int = sae.cfg.d_in
    threshold: float = sae.threshold

    steering_cfg = ds.SteeringConfig(concept="striped style", strength=-2.0, gate="striped")
    steer = ds.ConceptSteering(sae, steering_cfg)
    scale = ds.FeatureScaling(sae, ds.FeatureScalingConfig(features={12: 0.0}, steps=(0, 10)))
    unlearn_cfg = ds.SAeUronConfig(concepts=("star",), multiplier=-10.0, top_n=2, scaling="latent")
    names: list[str] = ds.apply(pipe, steer, scale)
    removed: list[str] = ds.remove(pipe, names[0])
    with ds.intervene(pipe, ds.SAeUron(sae, ds.ConceptDictionary.load(sae_folder), unlearn_cfg)):
        # pipe(...) plus the rewind of an open edit that asks for it (one generator per image)
        ds.generate(pipe, ["a red star"], generator=[torch.Generator().manual_seed(0)], num_inference_steps=25)
    open_now: list[str] = ds.applied(pipe)

    registered: list[str] = ds.intervention_names()
    again = ds.build_intervention("scale", sae, ["features=12:0"])
    ds.register_intervention("scale-copy", ds.FeatureScalingConfig,
                             lambda s, c, ctx: ds.FeatureScaling(s, c), sae="block")

    probe: ds.ConceptProbe = ds.ConceptProbe.from_pretrained(sae_folder / "probe")
    detector = probe.detector("striped", threshold=0.5)
    fitted = ds.fit_concept_probe(pipe, "unet.up_blocks.1.attentions.0", {"striped": ["a striped star"],
                                                                          "dotted": ["a dotted star"]}, 7)
    outcomes: ds.ConceptProbe = ds.fit_probe_on_activations("unet.up_blocks.1.attentions.0", 3, ["striped", "dotted"],
                                                            torch.randn(8, 32), torch.tensor([0, 1] * 4))
    gated = ds.SteeringConfig(concept="striped style", concept_words="striped", rivals="dotted", implicit=0.2,
                              implicit_from_step=8, detector=str(sae_folder / "probe"), detector_threshold=0.5,
                              named_late=4.0)

    trainer = ds.Trainer(sae.cfg, ds.TrainConfig(lr=1e-3, batch_size=4096))
    collect_cfg = ds.CollectConfig(hookpoints=["unet.up_blocks.1.attentions.1"], steps=25)
    styles: list[str] = list(ds.SHAPESCANVAS_STYLES)
    folder: Path = ds.shapescanvas_sae_dir()
    try:
        pass
    except ds.DiffusionSAEError as e:
        print(e)
    del width, threshold, again, trainer, collect_cfg, styles, folder, registered, detector, fitted, outcomes, gated
    return removed + open_now
