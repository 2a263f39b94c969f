"""Feature statistics on the bundled ShapesCanvas model and SAEs (few prompts, few steps)."""
from __future__ import annotations

import pytest
import torch

from diffusion_sae.concepts.features import (ConceptIndex, FeatureError, collect_feature_stats,
                                             text_feature_stats)
from diffusion_sae.models import StepTracker, as_tokens, output_tensor, resolve_hookpoint
from diffusion_sae.world import assets, bundle

PROMPTS = ["a red circle in solid style", "a blue star in striped style", "a green heart in dotted style",
           "a yellow ring in wavy style", "a purple square in checkered style"]
STEPS = 4


@pytest.fixture(scope="module")
def pipe():
    return assets.load_pipeline()


@pytest.fixture(scope="module")
def sae():
    return bundle.load_block_sae()


@pytest.fixture(scope="module")
def stats(pipe, sae):
    return collect_feature_stats(pipe, sae, prompts=PROMPTS, seeds=[0, 1, 2, 3, 4], steps=STEPS, batch_size=2)


@pytest.fixture(scope="module")
def index():
    return ConceptIndex({k: bundle.load_dictionary(k) for k in bundle.KINDS})


def test_stats_shapes_and_images(stats, pipe, sae):
    L = sae.cfg.num_latents
    assert stats.step_act.shape == (5, STEPS, L)
    assert stats.patch_act.shape[0] == 5 and stats.patch_act.shape[2] == L
    h, w = stats.grid
    assert h * w == stats.patch_act.shape[1]
    assert stats.images.shape == (5, 32, 32, 3) and stats.images.dtype == torch.uint8
    # The recorded image is the pipeline's own output for that prompt and seed (batching changes nothing).
    ref = pipe(PROMPTS[3], num_inference_steps=STEPS, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(3), output_type="pt").images[0]
    ref = (ref.clamp(0, 1) * 255).round().permute(1, 2, 0)
    assert (stats.images[3].float() - ref).abs().max() <= 1
    # Both summaries average the same numbers: per image and feature, mean over steps == mean over patches.
    a = stats.step_act.float().mean(1)
    b = stats.patch_act.float().mean(1)
    assert torch.allclose(a, b, atol=2e-3, rtol=1e-2)


def test_stats_match_a_direct_capture(stats, pipe, sae):
    """Recompute one image's latents at one step with a separate hook: same per-patch activations."""
    hp = resolve_hookpoint(pipe, bundle.BLOCK_HOOKPOINT)
    tracker, got = StepTracker(pipe), {}
    f = stats.top_features(1)[0]

    def hook(mod, args, out):
        tok, _ = as_tokens(output_tensor(out, hp.module))
        z = sae.dense_latents(tok[tracker.branches(tok.shape[0])["cond"]])
        got[tracker.step_index] = z[0, :, f].float()

    h = hp.module.register_forward_hook(hook)
    try:
        with tracker:
            pipe(PROMPTS[1], num_inference_steps=STEPS, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(1), output_type="latent")
    finally:
        h.remove()
    per_step = torch.stack([got[t].mean() for t in range(STEPS)])
    assert torch.allclose(stats.step_act[1, :, f].float(), per_step, atol=5e-3, rtol=1e-2)
    heat = torch.stack([got[t] for t in range(STEPS)]).mean(0).reshape(stats.grid)
    assert torch.allclose(stats.heatmap(f, 1), heat, atol=5e-3, rtol=1e-2)


def test_top_images_sorted_and_curves(stats):
    f = stats.top_features(3)[0]
    tops = stats.top_images(f, 3)
    scores = [t.score for t in tops]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    assert tops[0].prompt == PROMPTS[tops[0].index] and tops[0].heatmap.shape == stats.grid
    assert stats.image_scores(f).argmax().item() == tops[0].index
    curve = stats.step_curve(f)
    assert curve.shape == (STEPS,)
    assert torch.allclose(curve.mean(), stats.image_scores(f).mean(), atol=1e-3)
    # top features really are ranked by their strongest image
    peaks = [float(stats.image_scores(j).max()) for j in stats.top_features(3)]
    assert peaks == sorted(peaks, reverse=True)


def test_feature_errors(stats, index):
    for bad in (-1, stats.num_latents, "x", 2.5):
        with pytest.raises(FeatureError):
            stats.top_images(bad)
    with pytest.raises(FeatureError, match="try"):
        index.search("redd")


def test_concept_index_agrees_with_dictionary(index):
    d = bundle.load_dictionary("colour")
    concept, hits = index.search("Red")
    assert concept == "red"
    s = d.scores("red").mean(0)
    assert hits[0][0] == int(s.argmax())
    assert abs(hits[0][1] - float(s.max())) < 1e-6
    # The feature a concept ranks first names that concept (or a stronger one) among its top concepts, rank 1.
    top = index.top_concepts(hits[0][0], n=len(index.concepts))
    red = [h for h in top if h.concept == "red"][0]
    assert red.rank == 1 and red.kind == "colour"
    assert [h.score for h in top] == sorted((h.score for h in top), reverse=True)


def test_text_feature_stats(pipe):
    tsae = bundle.load_text_sae()
    ts = text_feature_stats(pipe, tsae, PROMPTS[:3])
    assert ts.tokens[0][2].startswith("red")
    # A feature that fires on the "red" token of the first prompt lists that token among its top ones.
    j = int(ts.acts[0, 2].argmax())
    assert ts.acts[0, 2, j] > 0
    top = ts.top_tokens(j, n=50)
    assert any(p == PROMPTS[0] and pos == 2 for p, _, pos, _ in top)
    assert all(a > 0 for *_, a in top)
