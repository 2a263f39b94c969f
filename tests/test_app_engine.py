"""What the UI's Generate button does, without a browser: edits change the image, bad rows fail in one line."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_sae.app.engine import Edit, EditError, scale_block_features
from diffusion_sae.app.shapescanvas import bundled_engine
from diffusion_sae.world import bundle

PROMPT = "a red circle in solid style"


@pytest.fixture(scope="module")
def engine():
    return bundled_engine(stats_prompts=[PROMPT], stats_seeds=[0], stats_steps=2)


def _diff(a, b) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_no_edit_and_zero_strength_return_the_original(engine):
    o, r = engine.generate(PROMPT, 0, 10, [Edit("red", "text steering", 0.0), Edit("", "block ablation", -1)])
    assert o.shape == (32, 32, 3) and o.dtype == np.uint8
    assert np.array_equal(o, r)


@pytest.mark.parametrize("edit", [Edit("red", "text steering", -2.0), Edit("red", "block ablation", -1.0),
                                  Edit("blue", "block ablation", 2.0), Edit("#top", "block ablation", -1.0)])
def test_each_method_changes_the_image(engine, edit):
    if edit.target == "#top":   # a feature that fires on this prompt (7 may not)
        edit = Edit(f"#{engine.stats().top_features(1)[0]}", edit.method, edit.strength)
    steps = bundle.STEPS if edit.method == "block ablation" else 10
    o, r = engine.generate(PROMPT, 0, steps, [edit])
    assert _diff(o, r) > 0.5, edit
    # deterministic: the same request gives the same pixels
    assert np.array_equal(engine.generate(PROMPT, 0, steps, [edit])[1], r)


def test_stronger_text_steering_moves_further(engine):
    o, weak = engine.generate(PROMPT, 0, 10, [Edit("red", "text steering", -0.3)])
    _, strong = engine.generate(PROMPT, 0, 10, [Edit("red", "text steering", -3.0)])
    assert _diff(o, strong) > _diff(o, weak)


def test_feature_scaling_by_one_is_identity(engine):
    pipe = engine.pipe
    f = engine.stats().top_features(1)[0]
    kw = dict(num_inference_steps=6, guidance_scale=5.0, output_type="pt")
    base = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    with scale_block_features(pipe, engine.block_sae, engine.block_hookpoint, {f: 1.0, 100: 1.0}):
        same = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.allclose(base, same, atol=1e-5)
    # the hook is gone after the block
    again = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(base, again)


@pytest.mark.parametrize("edits, match", [
    ([Edit("#7", "text steering", -1)], "block ablation"),
    ([Edit("#5000", "block ablation", -1)], "out of range"),
    ([Edit("nudity", "block ablation", -1)], "neither"),
    ([Edit("red", "paint", -1)], "method"),
])
def test_bad_edits_are_one_line(engine, edits, match):
    with pytest.raises(EditError, match=match) as e:
        engine.generate(PROMPT, 0, 25, edits)
    assert "\n" not in str(e.value)


def test_block_ablation_on_another_step_grid_says_so(engine):
    from diffusion_sae.interventions.ablate import StepGridError

    with pytest.raises(StepGridError, match="25 steps"):
        engine.generate(PROMPT, 0, 10, [Edit("red", "block ablation", -1)])
