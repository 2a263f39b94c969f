"""Concept Steerers and SAeUron on tiny random-weight SD 1.x / SDXL / SD3 / FLUX pipelines."""
import pytest
import torch

from diffusion_sae.concepts.dictionary import ConceptDictionary, DictionaryError, build_concept_dictionary
from diffusion_sae.interventions.ablate import StepGridError, unlearn_concepts
from diffusion_sae.interventions.steer import (SteeringError, concept_steering, feature_steering,
                                               orthogonalize_rows, steer_text_encoder)
from _tiny import tiny
from diffusion_sae.models import list_hookpoints, resolve_hookpoint
from diffusion_sae.sae import TopKSAE

FAMILIES = ["sd", "sdxl", "sd3", "flux"]


@pytest.fixture(scope="module")
def pipes():
    cache = {}

    def get(fam):
        if fam not in cache:
            p = tiny(fam)
            p.set_progress_bar_config(disable=True)
            cache[fam] = p
        return cache[fam]
    return get


def _gen(pipe, prompt="a photo of a dog", steps=3, seed=0, height=32, width=32, **kw):
    fam = type(pipe).__name__
    g = 3.5 if "Flux" in fam else 5.0
    return pipe(prompt, num_inference_steps=steps, guidance_scale=g, generator=torch.Generator().manual_seed(seed),
                output_type="pt", height=height, width=width, **kw).images


def _sae(width, mult=4, k=8, seed=0):
    torch.manual_seed(seed)
    return TopKSAE(width, mult * width, k)


def _no_hooks(pipe):
    mods = [m for c in ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer")
            for m in (getattr(pipe, c, None).modules() if getattr(pipe, c, None) is not None else [])]
    # transformers installs permanent output-capturing hooks of its own when hidden states are asked for.
    ours = [h for m in mods for h in list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values())
            if "output_capturing_hook" not in getattr(h, "__qualname__", "")]
    return not ours and "encode_prompt" not in pipe.__dict__


# ------------------------------------------------------------------------------------------ steering
@pytest.mark.parametrize("fam", FAMILIES)
def test_steering_changes_image_and_zero_strength_is_exact(pipes, fam):
    pipe = pipes(fam)
    name = list_hookpoints(pipe, "text")[-2]
    hp = resolve_hookpoint(pipe, name)
    sae = _sae(hp.width)
    st = concept_steering(sae, pipe, name, "a striped cat", -2.0)
    base = _gen(pipe)
    with steer_text_encoder(pipe, st):
        steered = _gen(pipe)
    with steer_text_encoder(pipe, st.scaled(0.0)):
        zero = _gen(pipe)
    assert (steered - base).abs().max() > 1e-3
    assert torch.equal(zero, base)
    assert _no_hooks(pipe)


def test_explicit_branches_equal_faithful_call_counting_on_sd(pipes):
    pipe = pipes("sd")
    name = "text_encoder.text_model.encoder.layers.9"
    sae = _sae(resolve_hookpoint(pipe, name).width)
    st = concept_steering(sae, pipe, name, "naked, nude, bare", -0.5)
    with steer_text_encoder(pipe, st):
        ours = _gen(pipe, negative_prompt=None)
    with steer_text_encoder(pipe, st, faithful=True):
        faithful = _gen(pipe)
        # a second generation in the same context starts its count again, as the official per-image hooks do
        faithful_again = _gen(pipe)
    assert (ours - faithful).abs().max() < 1e-5
    assert (faithful_again - faithful).abs().max() < 1e-5
    # negative steering off differs: the unconditional branch is then unsteered
    with steer_text_encoder(pipe, st, negative_steering=False):
        pos_only = _gen(pipe)
    assert (pos_only - ours).abs().max() > 1e-4


def test_negative_branch_gets_minus_s(pipes):
    """Encodings seen by the UNet: prompt + S and negative − S, checked against direct encodes."""
    pipe = pipes("sd")
    name = "text_encoder.text_model.encoder.layers.5"
    sae = _sae(resolve_hookpoint(pipe, name).width)
    st = concept_steering(sae, pipe, name, "striped", 1.5)
    seen = {}

    def grab(mod, args, kwargs):
        seen["ehs"] = kwargs["encoder_hidden_states"].detach().clone()
    h = pipe.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with steer_text_encoder(pipe, st):
            _gen(pipe, prompt="a red cube", steps=1, negative_prompt="blurry")
    finally:
        h.remove()
    neg_seen, pos_seen = seen["ehs"].chunk(2)
    layer = resolve_hookpoint(pipe, name).module

    def enc(text, sign):
        hh = layer.register_forward_hook(lambda m, a, o: o + sign * st.matrix)
        try:
            return pipe.encode_prompt(text, "cpu", 1, False)[0]
        finally:
            hh.remove()
    assert torch.allclose(pos_seen, enc("a red cube", 1.0), atol=1e-6)
    assert torch.allclose(neg_seen, enc("blurry", -1.0), atol=1e-6)
    assert not torch.allclose(neg_seen, enc("blurry", 0.0), atol=1e-4)


def test_sdxl_joint_sae_splits_across_both_encoders(pipes):
    pipe = pipes("sdxl")
    names = ["text_encoder.text_model.encoder.layers.10", "text_encoder_2.text_model.encoder.layers.28"]
    width = sum(resolve_hookpoint(pipe, n).width for n in names)
    sae = _sae(width)
    st = concept_steering(sae, pipe, "+".join(names), "watercolor", -1.0)
    assert st.matrix.shape[-1] == width and st.widths == [resolve_hookpoint(pipe, n).width for n in names]
    base = _gen(pipe)
    with steer_text_encoder(pipe, st):
        out = _gen(pipe)
    assert (out - base).abs().max() > 1e-3 and _no_hooks(pipe)


def test_several_concepts_and_feature_steering(pipes):
    pipe = pipes("sd")
    name = "text_encoder.text_model.encoder.layers.9"
    sae = _sae(resolve_hookpoint(pipe, name).width)
    a = concept_steering(sae, pipe, name, "striped", -1.0)
    b = concept_steering(sae, pipe, name, "red", 0.5)
    with steer_text_encoder(pipe, [a, b]):
        both = _gen(pipe)
    with steer_text_encoder(pipe, a + b):
        summed = _gen(pipe)
    assert (both - summed).abs().max() < 1e-5
    f = feature_steering(sae, name, [3, 7], 2.0, pipe=pipe)
    assert torch.allclose(f.matrix, 2.0 * (sae.W_dec[3] + sae.W_dec[7]).detach(), atol=1e-6)
    with steer_text_encoder(pipe, f):
        feat = _gen(pipe)
    assert (feat - _gen(pipe)).abs().max() > 1e-4


def test_orthogonalize_rows_hand_computed():
    s = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    keep = torch.zeros(2, 2, 3)
    keep[0, 0] = torch.tensor([2.0, 0.0, 0.0])   # position 0 keeps x
    keep[1, 0] = torch.tensor([0.0, 0.0, 5.0])   # ... and z
    keep[0, 1] = torch.tensor([0.0, 3.0, 0.0])   # position 1 keeps y; its other keep row is zero
    out = orthogonalize_rows(s, keep)
    torch.testing.assert_close(out, torch.tensor([[0.0, 2.0, 0.0], [4.0, 0.0, 6.0]]))
    # A zero keep set (e.g. a position every prompt shares once the baseline is subtracted) removes nothing.
    torch.testing.assert_close(orthogonalize_rows(s, torch.zeros(3, 2, 3)), s)


def test_keep_concepts_make_the_steering_orthogonal_to_them(pipes):
    pipe = pipes("sd")
    name = "text_encoder.text_model.encoder.layers.9"
    sae = _sae(resolve_hookpoint(pipe, name).width)
    keep = ["a dog", "blue"]
    plain = concept_steering(sae, pipe, name, "red", -1.0, baseline="")
    ortho = concept_steering(sae, pipe, name, "red", -1.0, baseline="", keep=keep)
    assert ortho.meta["keep"] == keep and ortho.matrix.shape == plain.matrix.shape
    kept = torch.stack([concept_steering(sae, pipe, name, k, 1.0, baseline="").matrix for k in keep])  # [K, T, d]
    # every row is now orthogonal to the kept concepts' rows at its position, and it lost only that part
    assert float(torch.einsum("ktd,td->kt", kept, ortho.matrix).abs().max()) < 1e-4 * float(plain.matrix.norm())
    assert float((plain.matrix - ortho.matrix).norm()) > 1e-3 * float(plain.matrix.norm())
    with steer_text_encoder(pipe, ortho):
        img = _gen(pipe)
    assert (img - _gen(pipe)).abs().max() > 1e-4
    with pytest.raises(SteeringError, match="keep concept is empty"):
        concept_steering(sae, pipe, name, "red", -1.0, keep=[" "])


def test_baseline_prompts_are_averaged_and_matched_pairs_cancel_what_they_share(pipes):
    pipe = pipes("sd")
    name = "text_encoder.text_model.encoder.layers.9"
    sae = _sae(resolve_hookpoint(pipe, name).width)
    pos, neg = ["a red car", "a red dog"], ["a blue car", "a blue dog", "a green car"]
    st = concept_steering(sae, pipe, name, pos, -1.0, baseline=neg, gate="red")
    a = concept_steering(sae, pipe, name, pos, 1.0).matrix
    b = torch.stack([concept_steering(sae, pipe, name, p, 1.0).matrix for p in neg]).mean(0)
    torch.testing.assert_close(st.matrix, -(a - b))
    assert st.meta["baseline"] == neg
    # the text encoder is causal: BOS and "a" read the same tokens in every pair, so their rows are zero
    assert float(st.matrix[:2].abs().max()) < 1e-5 < float(st.matrix[2:].abs().max())
    with steer_text_encoder(pipe, st):
        img = _gen(pipe, "a red dog")
    assert (img - _gen(pipe, "a red dog")).abs().max() > 1e-4
    with pytest.raises(SteeringError, match="baseline"):
        concept_steering(sae, pipe, name, pos, -1.0, baseline=[])


@pytest.mark.parametrize("fam", FAMILIES)
def test_hooks_removed_when_generation_raises(pipes, fam):
    pipe = pipes(fam)
    name = list_hookpoints(pipe, "text")[-2]
    st = concept_steering(_sae(resolve_hookpoint(pipe, name).width), pipe, name, "striped", -1.0)

    def boom(*a, **k):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with steer_text_encoder(pipe, st):
            _gen(pipe, callback_on_step_end=boom)
    assert _no_hooks(pipe)


def test_steering_bad_inputs(pipes):
    pipe = pipes("sd")
    name = "text_encoder.text_model.encoder.layers.9"
    sae = _sae(resolve_hookpoint(pipe, name).width)
    with pytest.raises(SteeringError, match="not in a text encoder"):
        concept_steering(sae, pipe, "unet.up_blocks.1.attentions.1", "striped", -1.0)
    with pytest.raises(SteeringError, match="SAE width"):
        concept_steering(_sae(48), pipe, name, "striped", -1.0)
    with pytest.raises(SteeringError, match="empty"):
        concept_steering(sae, pipe, name, "  ", -1.0)
    with pytest.raises(SteeringError, match="number"):
        concept_steering(sae, pipe, name, "striped", "strong")


def test_family_gate_through_concept_steering_leaves_a_rival_prompt_alone(pipes):
    """rivals in SteeringConfig put a FamilyGate on S: a prompt naming only a rival is generated exactly as
    without steering, one naming the concept is steered."""
    from diffusion_sae.interventions.api import ConceptSteering, intervene
    from diffusion_sae.interventions.steer import FamilyGate

    pipe = pipes("sd")
    name = "text_encoder.text_model.encoder.layers.9"
    sae = _sae(resolve_hookpoint(pipe, name).width)
    iv = ConceptSteering(sae, concept="a cat", strength=-2, hookpoint=name, concept_words=("cat",),
                         rivals=("dog",), implicit=0.0, match="tokens")
    assert isinstance(iv.steering(pipe).rows, FamilyGate)
    dog, cat = _gen(pipe, "a photo of a dog"), _gen(pipe, "a photo of a cat")
    with intervene(pipe, iv):
        s_dog, s_cat = _gen(pipe, "a photo of a dog"), _gen(pipe, "a photo of a cat")
    assert torch.equal(s_dog, dog)
    assert (s_cat - cat).abs().max() > 1e-3
    # without the gate the same S changes the rival's prompt too
    with intervene(pipe, ConceptSteering(sae, concept="a cat", strength=-2, hookpoint=name)):
        assert (_gen(pipe, "a photo of a dog") - dog).abs().max() > 1e-3
    assert _no_hooks(pipe)


# ------------------------------------------------------------------------------------------ SAeUron
CONCEPTS = {"cat": ["a cat", "a small cat"], "dog": ["a dog", "a big dog"], "car": ["a car", "a red car"]}


@pytest.fixture(scope="module")
def sd_dictionary(pipes):
    pipe = pipes("sd")
    name = "unet.up_blocks.1.attentions.1"
    sae = _sae(resolve_hookpoint(pipe, name).width, mult=8, k=4)
    d = build_concept_dictionary(pipe, sae, name, CONCEPTS, steps=3, guidance=5.0, height=32, width=32)
    return pipe, sae, d


def test_dictionary_shapes_scores_and_roundtrip(sd_dictionary, tmp_path):
    pipe, sae, d = sd_dictionary
    assert d.means.shape == (3, 3, sae.cfg.num_latents)
    assert d.timesteps == [float(t) for t in pipe.scheduler.timesteps]
    s = d.scores("cat")
    mu = d.means[0]
    rest = (d.means[1] * 2 + d.means[2] * 2) / 4
    ref = mu / (mu.sum(-1, keepdim=True) + 1e-8) - rest / (rest.sum(-1, keepdim=True) + 1e-8)
    assert torch.allclose(s, ref, atol=1e-7)
    sel = d.select("cat", top_n=2)
    assert all(len(i) <= 2 for i in sel)
    assert all(set(i.tolist()) <= set(torch.topk(s[t], 2).indices.tolist()) for t, i in enumerate(sel))
    d.save(tmp_path)
    d2 = ConceptDictionary.load(tmp_path)
    assert torch.equal(d2.means, d.means) and d2.concepts == d.concepts and d2.timesteps == d.timesteps
    with pytest.raises(DictionaryError, match="not in the dictionary"):
        d.scores("cst")


def test_dictionary_labelled_by_the_image_files_samples_under_the_labellers_concept(sd_dictionary):
    """With a labeller each sample counts under the concept its finished image is given, whatever group its prompt
    sits in: a labeller that swaps cat and dog (the jobs run group by group, one batch) gives the prompt-labelled
    dictionary with those two rows swapped, means and per-patch tables alike; per-group seeds equal to the prompt
    indices reproduce the default seeding."""
    pipe, sae, d = sd_dictionary
    name = "unet.up_blocks.1.attentions.1"
    calls = []

    def swap(images):
        calls.append(images.shape)
        assert images.min() >= 0 and images.max() <= 1
        return ["dog", "dog", "cat", "cat", "car", "car"]

    groups = {f"group {i}": ps for i, ps in enumerate(CONCEPTS.values())}
    lab = build_concept_dictionary(pipe, sae, name, groups, seeds={g: [0, 1] for g in groups}, steps=3,
                                   guidance=5.0, height=32, width=32, labeller=swap, labels=["cat", "dog", "car"])
    assert len(calls) == 1 and calls[0][0] == 6
    assert lab.concepts == ["cat", "dog", "car"] and lab.counts == [2, 2, 2]
    order = [1, 0, 2]
    for table in ("means", "bars", "excess"):
        assert torch.allclose(getattr(lab, table), getattr(d, table)[order], atol=1e-6), table
    assert not torch.allclose(lab.means[0], d.means[0], atol=1e-4)   # the swap is visible
    one = build_concept_dictionary(pipe, sae, name, groups, steps=3, guidance=5.0, height=32, width=32,
                                   labeller=lambda im: ["cat"] * len(im), labels=["cat", "dog", "car"])
    assert one.counts == [6, 0, 0]
    assert torch.allclose(one.means[0], d.means.mean(0), atol=1e-6) and one.means[1:].abs().max() == 0
    with pytest.raises(DictionaryError, match="labeller must return one of"):
        build_concept_dictionary(pipe, sae, name, groups, steps=3, height=32, width=32,
                                 labeller=lambda im: ["bird"] * len(im), labels=["cat", "dog"])
    with pytest.raises(DictionaryError, match="labeller and labels go together"):
        build_concept_dictionary(pipe, sae, name, groups, steps=3, labeller=swap)
    with pytest.raises(DictionaryError, match="expected one per prompt"):
        build_concept_dictionary(pipe, sae, name, groups, seeds={"group 0": [0, 1]}, steps=3)
    assert _no_hooks(pipe)


def test_unlearning_noop_is_exact_and_faithful_is_not(sd_dictionary):
    pipe, sae, d = sd_dictionary
    base = _gen(pipe, "a cat")
    with unlearn_concepts(pipe, sae, d, "cat", multiplier=-1.0, top_n=0):
        noop = _gen(pipe, "a cat")
    assert torch.equal(noop, base)
    with unlearn_concepts(pipe, sae, d, "cat", multiplier=-1.0, top_n=0, faithful=True):
        faithful = _gen(pipe, "a cat")
    assert (faithful - base).abs().max() > 1e-3
    with unlearn_concepts(pipe, sae, d, ["cat", "dog"], multiplier=-20.0, top_n=3) as hook:
        edited = _gen(pipe, "a cat")
    assert (edited - base).abs().max() > 1e-4
    assert set(hook.features) == {"cat", "dog"}
    assert _no_hooks(pipe)


def test_sync_free_scale_path_equals_the_row_subset_path(sd_dictionary, monkeypatch):
    """On accelerators the scale edit decodes every row's change instead of asking the device which rows fired
    (a host-device sync per step); forced on the CPU, it gives the row-subset path's image within 1e-5 for one
    concept, two, and a detector-gated edit; a no-op stays bit for bit."""
    from diffusion_sae.interventions import ablate
    from diffusion_sae.interventions.ablate import ConceptEdit

    pipe, sae, d = sd_dictionary
    base = _gen(pipe, ["a cat", "a dog"])
    gated = ConceptEdit("cat", -20.0, top_n=3, detector=_FixedDetector("unet.up_blocks.1.attentions.0", 0, [True, False]))
    for edits in (["cat"], ["cat", "dog"], [gated]):
        images = {}
        for free in (False, True):
            monkeypatch.setattr(ablate, "_sync_free", lambda x, free=free: free)
            with unlearn_concepts(pipe, sae, d, edits, multiplier=-20.0, top_n=3):
                images[free] = _gen(pipe, ["a cat", "a dog"])
        assert (images[False] - base).abs().max() > 1e-3
        assert torch.allclose(images[True], images[False], atol=1e-5), (images[True] - images[False]).abs().max()
    with unlearn_concepts(pipe, sae, d, "cat", multiplier=-1.0, top_n=0):   # still the forced path
        assert torch.equal(_gen(pipe, ["a cat", "a dog"]), base)


def test_unlearning_timestep_window(sd_dictionary):
    """An edit restricted to a step window changes the image only through those steps: a window past the
    last step is an exact no-op, the first step alone differs from both plain and every step."""
    from diffusion_sae.interventions.ablate import ConceptEdit

    pipe, sae, d = sd_dictionary
    base = _gen(pipe, "a cat")
    def run(window):
        with unlearn_concepts(pipe, sae, d, [ConceptEdit("cat", -20.0, None, 3, window=window)]):
            return _gen(pipe, "a cat")
    every, first, past = run(None), run((0, 1)), run((50, 60))
    assert torch.equal(past, base)
    assert (first - base).abs().max() > 1e-4 and (first - every).abs().max() > 1e-4
    with pytest.raises(DictionaryError, match="window"):
        ConceptEdit("cat", window=(3, 1))


def test_saeuron_window_through_the_config_and_unlearn_concepts(sd_dictionary):
    """SAeUronConfig.window reaches the edit: a window covering no step is an exact no-op, the first step
    alone differs from both plain and every step, and unlearn_concepts(window=) gives the same images."""
    from diffusion_sae.interventions.api import SAeUron, intervene

    pipe, sae, d = sd_dictionary
    base = _gen(pipe, "a cat")

    def run(**kw):
        with intervene(pipe, SAeUron(sae, d, concepts="cat", multiplier=-20.0, top_n=3, **kw)):
            return _gen(pipe, "a cat")
    every, first, past = run(), run(window=(0, 1)), run(window=(50, 60))
    assert torch.equal(past, base)
    assert (first - base).abs().max() > 1e-4 and (first - every).abs().max() > 1e-4
    with unlearn_concepts(pipe, sae, d, "cat", multiplier=-20.0, top_n=3, window=(0, 1)) as hook:
        assert torch.equal(_gen(pipe, "a cat"), first)
    assert hook.edits[0].window == (0, 1)
    assert _no_hooks(pipe)


def test_unlearning_step_grid_mismatch_and_hook_removal(sd_dictionary):
    pipe, sae, d = sd_dictionary
    with pytest.raises(StepGridError, match="3 steps"):
        with unlearn_concepts(pipe, sae, d, "cat", top_n=1):
            _gen(pipe, "a cat", steps=4)
    assert _no_hooks(pipe)


@pytest.mark.parametrize("fam,block", [("sdxl", "unet.up_blocks.0.attentions.1"),
                                       ("flux", "transformer.single_transformer_blocks.0"),
                                       ("flux", "transformer.transformer_blocks.0")])
def test_unlearning_on_sdxl_and_flux_blocks(pipes, fam, block):
    pipe = pipes(fam)
    sae = _sae(resolve_hookpoint(pipe, block).width, mult=8, k=4)
    g = 3.5 if fam == "flux" else 5.0
    d = build_concept_dictionary(pipe, sae, block, CONCEPTS, steps=3, guidance=g, height=32, width=48)
    base = _gen(pipe, "a cat", width=48)
    with unlearn_concepts(pipe, sae, d, "cat", multiplier=-1.0, top_n=0):
        noop = _gen(pipe, "a cat", width=48)
    with unlearn_concepts(pipe, sae, d, "cat", multiplier=-30.0, top_n=4):
        edited = _gen(pipe, "a cat", width=48)
    assert torch.equal(noop, base)
    assert (edited - base).abs().max() > 1e-4
    assert _no_hooks(pipe)


# ------------------------------------------------------------------ token-aligned steering, several blocks
@pytest.mark.parametrize("fam", ["sd", "sdxl"])
def test_gated_steering_leaves_other_prompts_untouched(pipes, fam):
    pipe = pipes(fam)
    names = list_hookpoints(pipe, "text")
    name = names[1]
    sae = _sae(resolve_hookpoint(pipe, name).width)
    st = concept_steering(sae, pipe, name, "striped", -3.0, gate="striped")
    assert st.gate and st.matrix.shape == concept_steering(sae, pipe, name, "striped", -3.0).matrix.shape
    base_other, base_named = _gen(pipe, "a photo of a dog"), _gen(pipe, "a striped dog")
    with steer_text_encoder(pipe, st):
        other, named = _gen(pipe, "a photo of a dog"), _gen(pipe, "a striped dog")
    assert torch.equal(other, base_other)                      # the concept's tokens are not in it
    assert (named - base_named).abs().max() > 1e-3
    # the same matrix applied at every position (the paper) changes the other prompt too
    with steer_text_encoder(pipe, concept_steering(sae, pipe, name, "striped", -3.0)):
        paper_other = _gen(pipe, "a photo of a dog")
    assert (paper_other - base_other).abs().max() > 1e-3
    assert _no_hooks(pipe)
    # a batch mixing both: only the row that names the concept changes (and its negative row)
    with steer_text_encoder(pipe, st):
        mixed = pipe(["a photo of a dog", "a striped dog"], num_inference_steps=3, guidance_scale=5.0,
                     generator=[torch.Generator().manual_seed(0) for _ in range(2)], output_type="pt",
                     height=32, width=32).images
    assert torch.allclose(mixed[0], base_other[0], atol=1e-5) and torch.allclose(mixed[1], named[0], atol=1e-5)
    with pytest.raises(SteeringError, match="gate text is empty"):
        concept_steering(sae, pipe, name, "striped", -1.0, gate=" ")


def test_latent_scaling_and_several_blocks(sd_dictionary):
    from diffusion_sae.interventions.ablate import ConceptEdit

    pipe, sae, d = sd_dictionary
    name2 = "unet.up_blocks.1.attentions.0"
    sae2 = _sae(resolve_hookpoint(pipe, name2).width, mult=8, k=4, seed=1)
    d2 = build_concept_dictionary(pipe, sae2, name2, CONCEPTS, steps=3, guidance=5.0, height=32, width=32)
    base = _gen(pipe, "a cat")
    # scaling="latent" with γ = 1 keeps every latent: the block output is unchanged
    with unlearn_concepts(pipe, [sae, sae2], [d, d2], [ConceptEdit("cat", 1.0, top_n=4, scaling="latent")]) as hooks:
        same = _gen(pipe, "a cat")
    assert len(hooks) == 2 and torch.allclose(same, base, atol=1e-5)
    with unlearn_concepts(pipe, sae, d, "cat", multiplier=-3.0, top_n=4, scaling="latent"):
        one = _gen(pipe, "a cat")
    with unlearn_concepts(pipe, [sae, sae2], [d, d2], "cat", multiplier=-3.0, top_n=4, scaling="latent"):
        two = _gen(pipe, "a cat")
    assert (one - base).abs().max() > 1e-4 and (two - one).abs().max() > 1e-4
    assert _no_hooks(pipe)
    with pytest.raises(DictionaryError, match="one concept dictionary per SAE"):
        with unlearn_concepts(pipe, [sae, sae2], [d], "cat"):
            pass
    with pytest.raises(DictionaryError, match="scaling"):
        ConceptEdit("cat", -1.0, scaling="huge")


def test_specificity_bars_and_excess_hand_computed():
    from diffusion_sae.concepts.dictionary import HIST_EDGES, _specificity

    B = len(HIST_EDGES) + 1
    hist = torch.zeros(3, 1, 2, B)
    e = HIST_EDGES

    def put(c, j, value, n):
        hist[c, 0, j, int(torch.bucketize(torch.tensor(value), e))] += n

    # latent 0: concept 0 fires at 2.0 on half its patches; concepts 1 and 2 never fire -> bar 0
    put(0, 0, 2.0, 50)
    put(0, 0, 0.0, 50)
    put(1, 0, 0.0, 100)
    put(2, 0, 0.0, 100)
    # latent 1: everybody fires at 1.0 on 60 % of patches -> bar ≈ 1.0, excess ≈ 0 for everyone
    for c in range(3):
        put(c, 1, 1.0, 60)
        put(c, 1, 0.0, 40)
    bars, excess = _specificity(hist, 0.95)
    assert bars[0, 0, 0] == 0 and abs(float(excess[0, 0, 0]) - 1.0) < 0.12      # 0.5 x 2.0 above a bar of 0
    assert abs(float(bars[0, 0, 1]) - 1.0) < 0.13 and float(excess[0, 0, 1]) < 0.01
    # concept 1's bar on latent 0 sees concept 0's firing patches (25 % of the others' pool) -> high bar
    assert float(bars[1, 0, 0]) >= 2.0 * 0.88 and float(excess[1, 0, 0]) == 0


def test_specific_selection_uses_the_others_quantile_as_bar(sd_dictionary, tmp_path):
    from diffusion_sae.interventions.ablate import ConceptEdit, SAeUronHook

    pipe, sae, d = sd_dictionary
    assert d.bars is not None and d.bars.shape == d.means.shape and (d.excess >= 0).all()
    sel = d.select("cat", top_n=2, method="specific")
    ex = d.specific_scores("cat")
    assert all(set(i.tolist()) <= set(torch.topk(ex[t], 2).indices.tolist()) for t, i in enumerate(sel))
    hook = SAeUronHook(sae, d, [ConceptEdit("cat", -2.0, top_n=2, selection="specific")])
    bar = d.concept_bar("cat")
    for t, ids in enumerate(sel):
        if len(ids):
            assert torch.allclose(hook.bar[0, t, ids], bar[t, ids])
    d.save(tmp_path)
    d2 = ConceptDictionary.load(tmp_path)
    assert torch.allclose(d2.bars, d.bars, rtol=1e-3) and torch.allclose(d2.excess, d.excess, rtol=1e-3, atol=1e-4)
    base = _gen(pipe, "a cat")
    with unlearn_concepts(pipe, sae, d, "cat", multiplier=-20.0, top_n=3, selection="specific"):
        edited = _gen(pipe, "a cat")
    assert (edited - base).abs().max() > 1e-4 and _no_hooks(pipe)
    old = ConceptDictionary(d.hookpoint, d.concepts, d.means, d.counts, d.timesteps)
    with pytest.raises(DictionaryError, match="rebuild"):
        old.select("cat", top_n=1, method="specific")
    with pytest.raises(DictionaryError, match="selection"):
        ConceptEdit("cat", -1.0, selection="best")


def test_min_fire_gates_patches_on_several_features_firing_together(sd_dictionary):
    from diffusion_sae.interventions.ablate import ConceptEdit, SAeUronHook

    pipe, sae, d = sd_dictionary
    g = torch.Generator().manual_seed(0)
    one = SAeUronHook(sae, d, [ConceptEdit("cat", -2.0, top_n=6, scaling="latent")])
    two = SAeUronHook(sae, d, [ConceptEdit("cat", -2.0, top_n=6, scaling="latent", min_fire=2)])
    never = SAeUronHook(sae, d, [ConceptEdit("cat", -2.0, top_n=6, scaling="latent", min_fire=7)])
    seen = set()
    for t in range(len(d.timesteps)):
        # patches built from two, one or none of the selected features (tied init: encoder row ≈ decoder row)
        ids = one.selected[0, t].nonzero().flatten()
        w = sae.W_dec.detach()
        x = torch.cat([4 * (w[ids[0]] + w[ids[1]]).expand(30, -1), 4 * w[ids[0]].expand(30, -1),
                       torch.randn(60, sae.cfg.d_in, generator=g)]) + 0.1 * torch.randn(120, sae.cfg.d_in, generator=g)
        acts, idx = sae.encode(x)
        fire = one.selected[0, t][idx] & (acts > one.bar[0, t][idx])
        n_fire = fire.sum(-1)
        e1, e2 = one.edit_tokens(x, t), two.edit_tokens(x, t)
        changed1 = (e1 - x).abs().amax(-1) > 1e-6
        changed2 = (e2 - x).abs().amax(-1) > 1e-6
        assert torch.equal(changed1, n_fire >= 1) and torch.equal(changed2, n_fire >= 2)
        # where the gate opens, the edit is the ungated one
        torch.testing.assert_close(e2[n_fire >= 2], e1[n_fire >= 2])
        assert torch.equal(never.edit_tokens(x, t), x)  # 7 > top_n features can never fire together
        seen |= {min(int(n), 2) for n in n_fire}
    assert seen == {0, 1, 2}  # patches with none, one and several firing features were all exercised
    with pytest.raises(DictionaryError, match="min_fire"):
        ConceptEdit("cat", -1.0, min_fire=0)


def _gate_probe(hook, sae, t, ids, g):
    """120 tokens at step t: 30 with three of the concept's selected latents (the min_fire=2 gate opens), 30 with
    one (it stays shut), 60 random; with the SAE code and the gate's firing mask, as the hook computes them."""
    w = sae.W_dec.detach()
    x = torch.cat([4 * (w[ids[0]] + w[ids[1]] + w[ids[2]]).expand(30, -1), 4 * w[ids[0]].expand(30, -1),
                   torch.randn(60, sae.cfg.d_in, generator=g)]) + 0.1 * torch.randn(120, sae.cfg.d_in, generator=g)
    acts, idx = sae.encode(x)
    fire = hook.selected[0, t][idx] & (acts > hook.bar[0, t][idx])
    fire &= fire.sum(-1, keepdim=True) >= 2
    return x, acts, idx, fire, fire.any(-1)


def test_replace_edit_sets_firing_features_to_the_other_concepts_mean(sd_dictionary):
    """edit="replace": where the gate fires, each firing selected latent becomes ref[t, j] = the mean over the
    other concepts of μ_c',j(t) (the decoded delta is exactly decode(ref − z)); where it does not fire the patch
    is bitwise unchanged; γ is ignored; the same detection as the scale edit decides which patches move."""
    from diffusion_sae.interventions.ablate import ConceptEdit, SAeUronHook, reference_means

    pipe, sae, d = sd_dictionary
    g = torch.Generator().manual_seed(2)
    kw = dict(top_n=6, scaling="latent", min_fire=2)
    rep = SAeUronHook(sae, d, [ConceptEdit("cat", -6.0, edit="replace", **kw)])
    rep_g = SAeUronHook(sae, d, [ConceptEdit("cat", 3.0, edit="replace", **kw)])       # γ plays no part
    scl = SAeUronHook(sae, d, [ConceptEdit("cat", -6.0, **kw)])
    ref = reference_means(d, "cat")
    torch.testing.assert_close(ref, (d.means[1] + d.means[2]) / 2)                        # dog and car, equally
    gated = ungated = 0
    for t in range(len(d.timesteps)):
        ids = rep.selected[0, t].nonzero().flatten()
        assert torch.equal(rep.offset[0, t, ids], ref[t, ids].to(rep.offset.dtype)) and not rep.scale[0, t, ids].any()
        x, acts, idx, fire, touched = _gate_probe(rep, sae, t, ids, g)
        got = rep.edit_tokens(x, t)
        assert torch.equal(got, rep_g.edit_tokens(x, t))
        # (b) patches where the gate stays shut: bitwise the input
        assert torch.equal(got[~touched], x[~touched])
        # (a) the firing latents go to the reference exactly, the others keep their value
        new = torch.where(fire, ref[t].to(acts.dtype)[idx], acts)
        rows = touched.nonzero().flatten()
        want = x[rows] + sae.decode(new[rows] - acts[rows], idx[rows], x=x[rows]) \
            - sae.decode(torch.zeros_like(acts[rows]), idx[rows], x=x[rows])
        torch.testing.assert_close(got[rows], want, rtol=0, atol=1e-6)
        # the scale edit touches the same patches, farther
        e_scale = scl.edit_tokens(x, t)
        assert torch.equal((e_scale - x).abs().amax(-1) > 0, touched)
        assert (got[rows] - x[rows]).norm() < (e_scale[rows] - x[rows]).norm()
        gated, ungated = gated + int(touched.sum()), ungated + int((~touched).sum())
    assert gated > 0 and ungated > 0


def test_patch_edits_replace_the_whole_firing_token(sd_dictionary):
    """edit="replace_patch": a patch where the gate fires becomes decode(z') with the firing selected latents of
    z' at ref[t, j] and the SAE error dropped; edit="mean_patch": it becomes decode_dense(ref[t]) + b_dec, the
    same vector for every firing patch. The detection is the scale edit's; unfired patches are bitwise the input."""
    from diffusion_sae.interventions.ablate import ConceptEdit, SAeUronHook, reference_means

    pipe, sae, d = sd_dictionary
    g = torch.Generator().manual_seed(3)
    kw = dict(top_n=6, scaling="latent", min_fire=2)
    rp = SAeUronHook(sae, d, [ConceptEdit("cat", -6.0, edit="replace_patch", **kw)])
    mp = SAeUronHook(sae, d, [ConceptEdit("cat", -6.0, edit="mean_patch", **kw)])
    mp_g = SAeUronHook(sae, d, [ConceptEdit("cat", 3.0, edit="mean_patch", **kw)])      # γ plays no part
    scl = SAeUronHook(sae, d, [ConceptEdit("cat", -6.0, **kw)])
    ref = reference_means(d, "cat")
    w, b = sae.W_dec.detach(), sae.b_dec.detach()
    gated = ungated = 0
    for t in range(len(d.timesteps)):
        ids = rp.selected[0, t].nonzero().flatten()
        torch.testing.assert_close(mp.ref_dense[0, t], ref[t].to(mp.ref_dense.dtype), rtol=0, atol=0)
        x, acts, idx, fire, touched = _gate_probe(rp, sae, t, ids, g)
        rows = touched.nonzero().flatten()
        got_r, got_m = rp.edit_tokens(x, t), mp.edit_tokens(x, t)
        assert torch.equal(got_m, mp_g.edit_tokens(x, t))
        # untouched patches: bitwise the input, for both
        assert torch.equal(got_r[~touched], x[~touched]) and torch.equal(got_m[~touched], x[~touched])
        # replace_patch: W_dec z' + b_dec, the firing latents at ref, the others as encoded, no error term
        new = torch.where(fire, ref[t].to(acts.dtype)[idx], acts)
        dense = torch.zeros(len(rows), sae.cfg.num_latents).scatter_(-1, idx[rows], new[rows])
        torch.testing.assert_close(got_r[rows], dense @ w + b, rtol=0, atol=1e-5)
        # mean_patch: W_dec ref[t] + b_dec on every firing patch
        want = (ref[t].float() @ w + b).expand(len(rows), -1)
        torch.testing.assert_close(got_m[rows], want, rtol=0, atol=1e-5)
        # the same detection as the scale edit
        assert torch.equal((scl.edit_tokens(x, t) - x).abs().amax(-1) > 0, touched)
        gated, ungated = gated + int(touched.sum()), ungated + int((~touched).sum())
    assert gated > 0 and ungated > 0


def test_tuning_candidate_names_carry_the_edit():
    from diffusion_sae.world.robust_tune import saeuron_name

    p = {"blocks": ["unet.up_blocks.1.attentions.0"], "top_n": 32, "multiplier": -2.0, "scaling": "latent",
         "selection": "specific", "min_fire": 6}
    assert "γ=-2 latent" in saeuron_name(p)
    for kind in ("replace", "replace_patch", "mean_patch"):
        name = saeuron_name(dict(p, edit=kind))
        assert f"n=32 {kind} latent/specific" in name and "γ" not in name     # γ is ignored by these edits


def test_replace_edit_is_checked_and_reaches_the_pipeline(sd_dictionary):
    from diffusion_sae.configs import ConfigError, SAeUronConfig
    from diffusion_sae.interventions.ablate import ConceptEdit, reference_means
    from diffusion_sae.interventions.api import SAeUron, intervene

    pipe, sae, d = sd_dictionary
    with pytest.raises(DictionaryError, match="edit must be 'scale'.*or 'replace'"):
        ConceptEdit("cat", -1.0, edit="swap")
    for bad in ("replace-patch", "mean", "patch", "Mean_patch"):
        with pytest.raises(DictionaryError, match="'replace_patch'.*'mean_patch'"):
            ConceptEdit("cat", -1.0, edit=bad)
        with pytest.raises(ConfigError, match="edit"):
            SAeUronConfig(concepts="cat", edit=bad)
    for kind in ("replace_patch", "mean_patch"):
        with pytest.raises(DictionaryError, match="faithful=False"):
            with unlearn_concepts(pipe, sae, d, "cat", top_n=2, edit=kind, faithful=True):
                pass
        with pytest.raises(DictionaryError, match="mode='ablate'"):
            with unlearn_concepts(pipe, sae, d, "cat", top_n=2, edit=kind, mode="add"):
                pass
        with pytest.raises(ConfigError, match="faithful"):
            SAeUronConfig(concepts="cat", edit=kind, faithful=True)
        assert SAeUronConfig(concepts="cat", edit=kind).edit == kind
    with pytest.raises(DictionaryError, match="faithful=False"):
        with unlearn_concepts(pipe, sae, d, "cat", top_n=2, edit="replace", faithful=True):
            pass
    with pytest.raises(DictionaryError, match="mode='ablate'"):
        with unlearn_concepts(pipe, sae, d, "cat", top_n=2, edit="replace", mode="add"):
            pass
    with pytest.raises(ConfigError, match="edit"):
        SAeUronConfig(concepts="cat", edit="swap")
    with pytest.raises(ConfigError, match="faithful"):
        SAeUronConfig(concepts="cat", edit="replace", faithful=True)
    one = ConceptDictionary(d.hookpoint, ["cat"], d.means[:1], d.counts[:1], d.timesteps)
    with pytest.raises(DictionaryError, match="other concepts"):
        reference_means(one, "cat")
    assert _no_hooks(pipe)
    base = _gen(pipe, "a cat")
    with unlearn_concepts(pipe, sae, d, "cat", multiplier=-20.0, top_n=3, edit="replace") as hook:
        rep = _gen(pipe, "a cat")
    assert hook.edits[0].edit == "replace" and (rep - base).abs().max() > 1e-4
    with intervene(pipe, SAeUron(sae, d, concepts="cat", top_n=3, edit="replace")):
        assert torch.equal(_gen(pipe, "a cat"), rep)                 # the config reaches the edit; γ ignored
    with unlearn_concepts(pipe, sae, d, "cat", multiplier=-20.0, top_n=3, edit="scale"):
        scale = _gen(pipe, "a cat")
    with unlearn_concepts(pipe, sae, d, "cat", multiplier=-20.0, top_n=3):
        assert torch.equal(_gen(pipe, "a cat"), scale)               # "scale" is the default
    assert _no_hooks(pipe)
    for kind in ("replace_patch", "mean_patch"):
        with unlearn_concepts(pipe, sae, d, "cat", multiplier=-20.0, top_n=3, edit=kind) as hook:
            img = _gen(pipe, "a cat")
        assert hook.edits[0].edit == kind and (img - base).abs().max() > 1e-4 and not torch.equal(img, rep)
        with intervene(pipe, SAeUron(sae, d, concepts="cat", top_n=3, edit=kind)):
            assert torch.equal(_gen(pipe, "a cat"), img)
    assert _no_hooks(pipe)


def test_register_edit_replaces_what_each_read_mode_reads():
    from diffusion_sae.models import Hookpoint, register_edit

    class Residual(torch.nn.Module):      # out = x + A x: input, update (A x) and output differ
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3, bias=False)

        def forward(self, hidden_states):
            return hidden_states + self.lin(hidden_states)

    torch.manual_seed(0)
    m, x = Residual(), torch.randn(2, 4, 3)
    ax = m.lin(x).detach()
    want = {"output": 2 * (x + ax), "input": 2 * x + m.lin(2 * x), "update": x + 2 * ax}
    for read, ref in want.items():
        hp = Hookpoint("m", "m", m, "unet", "denoiser", read, 3)
        handle = register_edit(hp, lambda t: 2 * t)
        try:
            got = m(x).detach()
            assert torch.allclose(got, ref.detach(), atol=1e-6), read
            assert torch.allclose(m(hidden_states=x).detach(), ref.detach(), atol=1e-6), read
        finally:
            handle.remove()
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert torch.allclose(m(x), x + ax, atol=1e-6)


@pytest.mark.parametrize("read", ["update", "input"])
def test_unlearning_at_update_and_input_hookpoints(pipes, read):
    """An SAE trained on a block's update (or input) is applied to that tensor, not to the block output."""
    pipe = pipes("sd")
    name = f"unet.up_blocks.1.attentions.1:{read}"
    sae = _sae(resolve_hookpoint(pipe, name).width, mult=8, k=4)
    d = build_concept_dictionary(pipe, sae, name, CONCEPTS, steps=3, guidance=5.0, height=32, width=32)
    d_out = build_concept_dictionary(pipe, sae, "unet.up_blocks.1.attentions.1", {"cat": CONCEPTS["cat"]},
                                     steps=3, guidance=5.0, height=32, width=32)
    assert not torch.allclose(d.means[0], d_out.means[0])       # the dictionary read the update / input
    base = _gen(pipe, "a cat")
    with unlearn_concepts(pipe, sae, d, "cat", multiplier=-1.0, top_n=0):
        assert torch.equal(_gen(pipe, "a cat"), base)
    with unlearn_concepts(pipe, sae, d, "cat", multiplier=-20.0, top_n=3, scaling="latent"):
        edited = _gen(pipe, "a cat")
    assert (edited - base).abs().max() > 1e-4
    assert _no_hooks(pipe)


def test_exclusive_edits_apply_only_the_concept_with_most_firing_features(sd_dictionary):
    from diffusion_sae.interventions.ablate import ConceptEdit, SAeUronHook

    pipe, sae, d = sd_dictionary
    g = torch.Generator().manual_seed(1)
    kw = dict(top_n=6, scaling="latent")
    cat, dog = (SAeUronHook(sae, d, [ConceptEdit(c, -2.0, **kw)]) for c in ("cat", "dog"))
    union = SAeUronHook(sae, d, [ConceptEdit("cat", -2.0, **kw), ConceptEdit("dog", -2.0, **kw)])
    excl = SAeUronHook(sae, d, [ConceptEdit("cat", -2.0, exclusive=True, **kw),
                                ConceptEdit("dog", -2.0, exclusive=True, **kw)])
    w = sae.W_dec.detach()
    both_seen = 0
    for t in range(len(d.timesteps)):
        ic, idg = cat.selected[0, t].nonzero().flatten(), dog.selected[0, t].nonzero().flatten()
        x = torch.cat([4 * (w[ic[0]] + w[ic[1]]).expand(20, -1), 4 * w[idg[0]].expand(20, -1),
                       4 * (w[ic[0]] + w[idg[0]] + w[idg[1]]).expand(20, -1),
                       torch.randn(40, sae.cfg.d_in, generator=g)]) + 0.1 * torch.randn(100, sae.cfg.d_in, generator=g)
        acts, idx = sae.encode(x)
        nc = (cat.selected[0, t][idx] & (acts > cat.bar[0, t][idx])).sum(-1)
        nd = (dog.selected[0, t][idx] & (acts > dog.bar[0, t][idx])).sum(-1)
        got, e_cat, e_dog = excl.edit_tokens(x, t), cat.edit_tokens(x, t), dog.edit_tokens(x, t)
        to_cat, to_dog, none = (nc >= nd) & (nc > 0), nd > nc, (nc == 0) & (nd == 0)
        torch.testing.assert_close(got[to_cat], e_cat[to_cat])
        torch.testing.assert_close(got[to_dog], e_dog[to_dog])
        assert torch.equal(got[none], x[none])
        # where only one concept fires, exclusive and the paper's union agree
        one = (nc == 0) ^ (nd == 0)
        torch.testing.assert_close(got[one], union.edit_tokens(x, t)[one])
        both_seen += int(((nc > 0) & (nd > 0)).sum())
    assert both_seen > 0   # patches where both concepts fire were exercised


def test_saeuron_faithful_encodes_per_token_topk_even_for_batch_topk_sae():
    """The official loader encodes with per-token TopK(k); a calibrated BatchTopK SAE's own encoding
    (threshold over the top inference_k) differs, so faithful mode must not use it."""
    from diffusion_sae.sae import SAEConfig, TopKSAE

    sae = TopKSAE(cfg=SAEConfig(d_in=16, num_latents=64, k=4, batch_topk=True, threshold=0.05), seed=1)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    acts, idx = sae.encode_topk(x)
    assert acts.shape == (32, 4)
    w = sae.W_enc if sae.W_enc.shape == (64, 16) else sae.W_enc.T
    pre = torch.relu((x - sae.b_dec) @ w.T + sae.b_enc)
    torch.testing.assert_close(acts.sort(-1).values, pre.topk(4, dim=-1).values.sort(-1).values, rtol=1e-4, atol=1e-5)
    thr_acts, _ = sae.encode(x)
    assert thr_acts.shape[-1] == 16           # inference_k = 4k latents, thresholded
    assert not torch.equal((thr_acts > 0).sum(-1), torch.full((32,), 4))   # the threshold's L0 varies


def test_family_gate_scales_s_per_prompt(pipes):
    """FamilyGate: the concept named -> steered; only a rival named -> exactly plain; none of the family
    named -> steered at the implicit fraction (0: plain, 1: as ungated)."""
    from diffusion_sae.interventions.steer import family_gate

    pipe = pipes("sd")
    name = "text_encoder.text_model.encoder.layers.9"
    sae = _sae(resolve_hookpoint(pipe, name).width)
    st = concept_steering(sae, pipe, name, "a cat", -2.0)
    plain = {p: _gen(pipe, p) for p in ("a photo of a cat", "a photo of a dog", "a photo of a car")}

    def under(implicit, prompt):
        gated = st.scaled(1.0)
        gated.rows = family_gate(pipe, name, ["cat"], ["dog"], implicit)
        with steer_text_encoder(pipe, gated):
            return _gen(pipe, prompt)

    assert (under(0.0, "a photo of a cat") - plain["a photo of a cat"]).abs().max() > 1e-3
    assert torch.equal(under(1.0, "a photo of a dog"), plain["a photo of a dog"])
    assert torch.equal(under(0.0, "a photo of a car"), plain["a photo of a car"])
    with steer_text_encoder(pipe, st):
        ungated_car = _gen(pipe, "a photo of a car")
    assert (under(1.0, "a photo of a car") - ungated_car).abs().max() < 1e-5
    half = under(0.5, "a photo of a car")
    assert 1e-4 < (half - plain["a photo of a car"]).abs().max()
    assert _no_hooks(pipe)


def test_embedding_match_labels_synonyms_by_nearest_reference():
    """EmbeddingMatch: a token whose embedding sits next to the target word's is the target (a synonym the
    token gate misses); one next to a rival is a rival; one next to a neutral word, or special, is neither."""
    from diffusion_sae.interventions.steer import EmbeddingMatch

    g = torch.Generator().manual_seed(0)
    e = torch.randn(10, 16, generator=g)
    e[5] = e[1] + 0.1 * torch.randn(16, generator=g)     # 5: a synonym of the target (1)
    e[6] = e[2] + 0.1 * torch.randn(16, generator=g)     # 6: a synonym of the rival (2)
    e[7] = e[3] + 0.1 * torch.randn(16, generator=g)     # 7: near the neutral word (3)
    m = EmbeddingMatch(e, target=[1], rivals=[2], neutral=[3, 4], special={0, 9})
    tok = torch.tensor([[0, 5, 3, 9], [0, 6, 3, 9], [0, 7, 4, 9], [0, 6, 5, 9], [0, 9, 9, 9]])
    assert m(tok) == ["target", "rival", None, "target", None]
    # a similarity floor above every match sends all tokens to "names nothing"
    assert EmbeddingMatch(e, [1], [2], [3, 4], {0, 9}, min_similarity=1.01)(tok) == [None] * 5


def test_family_gate_embedding_match_and_negative_branch(pipes):
    """match="embedding" steers a prompt that names the concept only by a word the text encoder embeds next to
    it (the token gate leaves that prompt plain); implicit_negative steers the negative branch alone."""
    from diffusion_sae.interventions.steer import family_gate

    pipe = pipes("sd")
    name = "text_encoder.text_model.encoder.layers.9"
    sae = _sae(resolve_hookpoint(pipe, name).width)
    st = concept_steering(sae, pipe, name, "a cat", -2.0)
    emb = pipe.text_encoder.get_input_embeddings().weight
    car = pipe.tokenizer("car", add_special_tokens=False).input_ids
    cat = pipe.tokenizer("cat", add_special_tokens=False).input_ids
    assert len(car) == len(cat) == 1
    saved = emb.data[car[0]].clone()
    try:
        emb.data[car[0]] = emb.data[cat[0]] * 1.01           # "car" becomes the model's synonym of "cat"
        plain = _gen(pipe, "a photo of a car")

        def under(**kw):
            gated = st.scaled(1.0)
            gated.rows = family_gate(pipe, name, ["cat"], ["dog"], 0.0, **kw)
            with steer_text_encoder(pipe, gated):
                return _gen(pipe, "a photo of a car")

        assert torch.equal(under(match="tokens"), plain)
        with steer_text_encoder(pipe, st):
            ungated = _gen(pipe, "a photo of a car")
        assert (under(match="embedding", neutral_words=["a", "photo", "of"]) - ungated).abs().max() < 1e-5
    finally:
        emb.data[car[0]] = saved
    # implicit 0 on the prompt, 1 on its negative branch: the prompt's encoding is plain, the negative one is not
    gated = st.scaled(1.0)
    gated.rows = family_gate(pipe, name, ["cat"], ["dog"], 0.0, implicit_negative=1.0)
    kw = dict(device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    p0, n0 = pipe.encode_prompt("a photo of a car", **kw)
    with steer_text_encoder(pipe, gated):
        p1, n1 = pipe.encode_prompt("a photo of a car", **kw)
    assert torch.equal(p0, p1) and (n1 - n0).abs().max() > 1e-3
    with pytest.raises(SteeringError, match="match must be"):
        family_gate(pipe, name, ["cat"], ["dog"], 0.0, match="fuzzy")
    assert _no_hooks(pipe)


# ------------------------------------------------------------------------------- implicit fraction from step k
def _ours(pipe) -> list[str]:
    """Names of our hooks left in the diffusers registries of the text encoders and the denoiser."""
    from diffusion_sae.models import registered

    mods = [m for c in ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer")
            if getattr(pipe, c, None) is not None for m in getattr(pipe, c).modules()]
    return [n for m in mods for n in registered(m) if n.startswith("diffusion_sae")]


def _from_step(pipe):
    """under(implicit, k, prompt): a 3-step image with a cat-vs-dog FamilyGate whose implicit fraction acts from k."""
    from diffusion_sae.interventions.steer import family_gate

    name = list_hookpoints(pipe, "text")[-2]
    st = concept_steering(_sae(resolve_hookpoint(pipe, name).width), pipe, name, "a cat", -2.0)

    def under(implicit, k=None, prompt="a photo of a car", **kw):
        gated = st.scaled(1.0)
        extra = {} if k is None else {"implicit_from_step": k}
        gated.rows = family_gate(pipe, name, ["cat"], ["dog"], implicit, **extra)
        with steer_text_encoder(pipe, gated):
            return _gen(pipe, prompt, **kw)
    return under


def test_implicit_from_step_zero_is_the_implicit_fraction_at_every_step(pipes):
    """implicit_from_step=0 (the default) is the FamilyGate as before, bit for bit, with no denoiser hook; a
    later step with an implicit fraction of 0 has nothing to wait for and adds no hook either."""
    from diffusion_sae.interventions.steer import FamilyGate

    pipe = pipes("sd")
    under = _from_step(pipe)
    for prompt in ("a photo of a car", "a photo of a cat"):
        assert torch.equal(under(0.5, 0, prompt), under(0.5, None, prompt))
    assert torch.equal(under(0.0, 5), under(0.0, None))
    assert FamilyGate([(1,)], [(2,)], 0.5).implicit_from_step == 0
    name = list_hookpoints(pipe, "text")[-2]
    st = concept_steering(_sae(resolve_hookpoint(pipe, name).width), pipe, name, "a cat", -2.0)
    for k, imp in ((0, 0.5), (4, 0.0)):
        st.rows = FamilyGate([(1,)], [(2,)], imp, implicit_from_step=k)
        with steer_text_encoder(pipe, st):
            assert not [n for n in _ours(pipe) if "implicit_from_step" in n]
    assert _no_hooks(pipe) and not _ours(pipe)


@pytest.mark.parametrize("fam", ["sd", "sdxl", "sd3"])
def test_implicit_from_step_past_the_last_step_is_implicit_zero(pipes, fam):
    """From a step the generation never reaches, a prompt naming none of the family is generated as with
    implicit 0 (SDXL: the pooled embeddings of text_encoder_2 are swapped too), while a prompt naming the
    concept is steered exactly as with the implicit fraction at every step."""
    pipe = pipes(fam)
    under = _from_step(pipe)
    zero, full, late = under(0.0), under(1.0), under(1.0, 3)
    assert (full - zero).abs().max() > 1e-3
    torch.testing.assert_close(late, zero, rtol=0, atol=1e-6)
    cat = under(1.0, 3, "a photo of a cat")
    assert torch.equal(cat, under(1.0, 0, "a photo of a cat"))
    assert (cat - _gen(pipe, "a photo of a cat")).abs().max() > 1e-3
    assert _no_hooks(pipe) and not _ours(pipe)


def test_implicit_from_step_in_the_middle_swaps_the_first_k_denoiser_calls(pipes):
    """k=1 of 3 steps: the image differs from implicit 0 and from the fraction at every step; the UNet receives
    the implicit-0 encoding on its first call only (one call per step: guidance batches both branches), and the
    count starts again with every pipeline call."""
    from diffusion_sae.models import PreForwardHook, register_hook

    pipe = pipes("sd")
    under = _from_step(pipe)
    zero, full = under(0.0), under(1.0)
    mid = under(1.0, 1)
    assert (mid - zero).abs().max() > 1e-4 and (mid - full).abs().max() > 1e-4
    assert (under(1.0, 2) - mid).abs().max() > 1e-4
    seen: list = []
    # registered first, so it runs after the steering's pre-hook and sees what the UNet gets
    handle = register_hook(pipe.unet, PreForwardHook(lambda m, a, kw: seen.append(kw["encoder_hidden_states"])),
                           "test.record")
    try:
        under(0.0), under(1.0)
        ehs0, ehs1 = seen[0], seen[3]
        seen.clear()
        again = [under(1.0, 1) for _ in range(2)]
    finally:
        handle.remove()
    assert (ehs0 - ehs1).abs().max() > 1e-3
    assert len(seen) == 6 and torch.equal(seen[0], ehs0) and torch.equal(seen[3], ehs0)
    assert all(torch.equal(seen[i], ehs1) for i in (1, 2, 4, 5))
    assert torch.equal(again[0], mid) and torch.equal(again[1], mid)
    assert _no_hooks(pipe) and not _ours(pipe)


def test_implicit_from_step_outside_the_sampling_loop_follows_the_timestep(pipes):
    """A denoiser call made outside the pipeline's loop (an attack's loss at one grid timestep, on one prompt's
    encoding expanded over noise samples) gets the implicit-0 encoding at timesteps before step k and the
    steered one from k on, whatever order the calls come in."""
    from diffusion_sae.interventions.steer import family_gate
    from diffusion_sae.models import PreForwardHook, register_hook

    pipe = pipes("sd")
    name = list_hookpoints(pipe, "text")[-2]
    st = concept_steering(_sae(resolve_hookpoint(pipe, name).width), pipe, name, "a cat", -2.0)
    pipe.scheduler.set_timesteps(3)
    ts = pipe.scheduler.timesteps

    def encode():
        return pipe.encode_prompt(prompt=["a photo of a car"], device="cpu", num_images_per_prompt=1,
                                  do_classifier_free_guidance=False)[0]

    encodings = {}
    for imp in (0.0, 1.0):
        st.rows = family_gate(pipe, name, ["cat"], ["dog"], imp)
        with steer_text_encoder(pipe, st):
            encodings[imp] = encode()
    assert (encodings[0.0] - encodings[1.0]).abs().max() > 1e-3
    st.rows = family_gate(pipe, name, ["cat"], ["dog"], 1.0, implicit_from_step=2)
    seen: list = []
    handle = register_hook(pipe.unet, PreForwardHook(lambda m, a, kw: seen.append(kw["encoder_hidden_states"])),
                           "test.record")
    c = pipe.unet.config
    x = torch.randn(3, c.in_channels, c.sample_size, c.sample_size)
    try:
        with steer_text_encoder(pipe, st), torch.no_grad():
            cond = encode()
            for j in (2, 0, 1, 2):
                pipe.unet(x, ts[j], encoder_hidden_states=cond.expand(3, -1, -1))
    finally:
        handle.remove()
    want = [encodings[1.0], encodings[0.0], encodings[0.0], encodings[1.0]]
    assert len(seen) == 4
    for got, w in zip(seen, want):
        assert torch.allclose(got, w.expand(3, -1, -1), atol=1e-6)


def test_implicit_from_step_hooks_removed_when_generation_raises(pipes):
    """A generation that raises mid-way leaves no hook and no encode_prompt wrapper after the block; inside
    the block, the next generation counts its steps from 0 again."""
    from diffusion_sae.interventions.steer import family_gate

    pipe = pipes("sd")
    under = _from_step(pipe)
    plain, mid = _gen(pipe, "a photo of a car"), under(1.0, 2)
    name = list_hookpoints(pipe, "text")[-2]
    st = concept_steering(_sae(resolve_hookpoint(pipe, name).width), pipe, name, "a cat", -2.0)
    st.rows = family_gate(pipe, name, ["cat"], ["dog"], 1.0, implicit_from_step=2)

    def boom(*a, **k):
        raise RuntimeError("boom")
    with steer_text_encoder(pipe, st):
        with pytest.raises(RuntimeError, match="boom"):
            _gen(pipe, "a photo of a car", callback_on_step_end=boom)
        assert torch.equal(_gen(pipe, "a photo of a car"), mid)
    with pytest.raises(RuntimeError, match="boom"):
        with steer_text_encoder(pipe, st):
            _gen(pipe, "a photo of a car", callback_on_step_end=boom)
    assert _no_hooks(pipe) and not _ours(pipe) and "encode_prompt" not in pipe.__dict__
    assert torch.equal(_gen(pipe, "a photo of a car"), plain)


def test_implicit_from_step_bad_values_and_unsupported_setups(pipes):
    import dataclasses

    from diffusion_sae.configs import ConfigError, SteeringConfig
    from diffusion_sae.interventions.api import ConceptSteering
    from diffusion_sae.interventions.steer import FamilyGate, family_gate

    for bad in (-1, 1.5, True, "3", None):
        with pytest.raises(SteeringError, match="implicit_from_step must be a non-negative whole number"):
            FamilyGate([(1,)], [(2,)], 0.1, implicit_from_step=bad)
        with pytest.raises(ConfigError, match="implicit_from_step must be a non-negative whole number"):
            SteeringConfig(concept="a cat", concept_words="cat", rivals="dog", implicit=0.1, implicit_from_step=bad)
    with pytest.raises(ConfigError, match="implicit_from_step only acts with rivals"):
        SteeringConfig(concept="a cat", implicit_from_step=8)
    cfg = SteeringConfig(concept="a cat", strength=-2, concept_words="cat", rivals="dog", implicit=0.2,
                         implicit_from_step=8, match="tokens")
    assert SteeringConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["implicit_from_step"] == 8
    pipe = pipes("sd")
    name = "text_encoder.text_model.encoder.layers.9"
    sae = _sae(resolve_hookpoint(pipe, name).width)
    with pytest.raises(SteeringError, match="implicit_from_step must be"):
        family_gate(pipe, name, ["cat"], ["dog"], 0.1, implicit_from_step=-2)
    iv = ConceptSteering(sae, dataclasses.replace(cfg, hookpoint=name))
    assert iv.steering(pipe).rows.implicit_from_step == 8
    with pytest.raises(SteeringError, match="faithful=False"):
        with steer_text_encoder(pipe, iv.steering(pipe), faithful=True):
            pass
    flux = pipes("flux")
    fname = list_hookpoints(flux, "text")[-2]
    st = concept_steering(_sae(resolve_hookpoint(flux, fname).width), flux, fname, "a cat", -2.0)
    st.rows = family_gate(flux, fname, ["cat"], ["dog"], 0.1, implicit_from_step=2)
    with pytest.raises(SteeringError, match="not supported on FLUX"):
        with steer_text_encoder(flux, st):
            pass
    assert _no_hooks(pipe) and not _ours(pipe) and _no_hooks(flux) and not _ours(flux)


# ------------------------------------------------------------------------------- image-side detector gate
class _FixedDetector:
    """A detector stub: flags the samples given, and records the rows it was shown."""

    def __init__(self, hookpoint, step, flags):
        self.hookpoint, self.step, self.flags, self.seen = hookpoint, step, flags, []

    def __call__(self, tokens):
        self.seen.append(tokens.shape[0])
        return torch.tensor(self.flags)


def _detected(pipe, det, prompts, implicit=1.0, k=1, **gate):
    from diffusion_sae.interventions.steer import family_gate

    name = list_hookpoints(pipe, "text")[-2]
    st = concept_steering(_sae(resolve_hookpoint(pipe, name).width), pipe, name, "a cat", -2.0)
    st.rows = family_gate(pipe, name, ["cat"], ["dog"], implicit, implicit_from_step=k, detector=det, **gate)
    with steer_text_encoder(pipe, st):
        return _gen(pipe, prompts)


def _two_unnamed(pipes, k):
    """The SD tiny pipeline, the detector block, two prompts naming neither concept, and their images with the
    implicit fraction at 0 and at 1 from step k (which differ on both samples)."""
    pipe = pipes("sd")
    prompts = ["a photo of a car", "a photo of a tree"]
    under = _from_step(pipe)
    zero, late = under(0.0, None, prompts), under(1.0, k, prompts)
    assert (late - zero).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    return pipe, "unet.up_blocks.1.attentions.0", prompts, under, zero, late


def test_detector_gate_steers_only_the_flagged_samples(pipes):
    """Two prompts naming neither concept, k=1 of 3 steps: the flagged sample equals the gate without a detector
    (implicit fraction from step 1), the other equals implicit 0, bit for bit; the detector reads the
    unconditional rows (one per sample) once; a prompt naming the concept is steered though not flagged."""
    pipe, block, prompts, under, zero, late = _two_unnamed(pipes, 1)
    det = _FixedDetector(block, 0, [True, False])
    out = _detected(pipe, det, prompts)
    assert det.seen == [2]
    torch.testing.assert_close(out[0], late[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], zero[1], rtol=0, atol=1e-6)
    none = _detected(pipe, _FixedDetector(block, 0, [False, False]), prompts)
    torch.testing.assert_close(none, zero, rtol=0, atol=1e-6)
    named = _detected(pipe, _FixedDetector(block, 0, [False]), ["a photo of a cat"])
    torch.testing.assert_close(named, under(1.0, 1, "a photo of a cat"), rtol=0, atol=1e-6)
    assert (named - _gen(pipe, "a photo of a cat")).abs().max() > 1e-3
    # named_late: S escalated from step k on a named prompt's flagged samples only
    unflagged = _detected(pipe, _FixedDetector(block, 0, [False]), ["a photo of a cat"], named_late=3.0)
    torch.testing.assert_close(unflagged, named, rtol=0, atol=1e-6)
    escalated = _detected(pipe, _FixedDetector(block, 0, [True]), ["a photo of a cat"], named_late=3.0)
    assert (escalated - named).abs().max() > 1e-3
    assert _no_hooks(pipe) and not _ours(pipe)


def test_detector_gate_rival_late_steers_only_flagged_rival_prompts(pipes):
    """rival_late: a prompt naming a rival stays bit for bit plain unless the detector flags its sample; the flagged
    one is steered from step k; the implicit fraction never reaches a rival prompt; without a detector it is refused."""
    from diffusion_sae.interventions.steer import FamilyGate

    pipe, block, prompts, under, zero, late = _two_unnamed(pipes, 1)
    rival = ["a photo of a dog", "a photo of a dog"]
    plain = _gen(pipe, rival)
    off = _detected(pipe, _FixedDetector(block, 0, [True, True]), rival)      # rival_late 0: the shipped default
    torch.testing.assert_close(off, plain, rtol=0, atol=1e-6)
    out = _detected(pipe, _FixedDetector(block, 0, [True, False]), rival, rival_late=1.0)
    torch.testing.assert_close(out[1], plain[1], rtol=0, atol=1e-6)
    assert (out[0] - plain[0]).abs().max() > 1e-3
    unnamed = _detected(pipe, _FixedDetector(block, 0, [True]), ["a photo of a dog"], implicit=1.0)
    assert (unnamed - plain[:1]).abs().max() < 1e-6      # the rival prompt is not "unnamed": implicit does not reach it
    with pytest.raises(SteeringError, match="rival_late=0.5 steers the rival prompts a detector flags"):
        FamilyGate([(1,)], [(2,)], 0.1, implicit_from_step=1, rival_late=0.5)
    assert _no_hooks(pipe) and not _ours(pipe)


def test_detector_gate_sdxl_swaps_pooled_embeddings_per_sample(pipes):
    pipe = pipes("sdxl")
    block = next(h for h in list_hookpoints(pipe, "denoiser") if "attentions" in h)
    prompts = ["a photo of a car", "a photo of a tree"]
    under = _from_step(pipe)
    zero, late = under(0.0, None, prompts), under(1.0, 1, prompts)
    out = _detected(pipe, _FixedDetector(block, 0, [False, True]), prompts)
    torch.testing.assert_close(out[0], zero[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], late[1], rtol=0, atol=1e-5)
    assert _no_hooks(pipe) and not _ours(pipe)


def test_detector_gate_hooks_removed_when_generation_raises_and_bad_setups(pipes):
    from diffusion_sae.interventions.steer import FamilyGate, family_gate

    pipe = pipes("sd")
    block = "unet.up_blocks.1.attentions.0"

    class Boom(_FixedDetector):
        def __call__(self, tokens):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _detected(pipe, Boom(block, 0, [True]), ["a photo of a car"])
    assert _no_hooks(pipe) and not _ours(pipe)
    with pytest.raises(SteeringError, match="needs implicit_from_step > 2"):
        FamilyGate([(1,)], [(2,)], 0.5, implicit_from_step=2, detector=_FixedDetector(block, 2, [True]))
    with pytest.raises(SteeringError, match="needs implicit_from_step > 0"):
        FamilyGate([(1,)], [(2,)], 0.5, detector=_FixedDetector(block, 0, [True]))
    with pytest.raises(SteeringError, match="detector must be a callable"):
        FamilyGate([(1,)], [(2,)], 0.5, implicit_from_step=2, detector="probe")
    with pytest.raises(SteeringError, match="named_late=2 needs implicit_from_step >= 1"):
        FamilyGate([(1,)], [(2,)], 0.5, named_late=2.0)
    with pytest.raises(SteeringError, match="must be finite"):
        FamilyGate([(1,)], [(2,)], 0.5, implicit_from_step=2, named_late=float("nan"))
    name = list_hookpoints(pipe, "text")[-2]
    with pytest.raises(SteeringError, match="not a denoiser block"):
        _detected(pipe, _FixedDetector(name, 0, [True]), ["a photo of a car"])
    sae = _sae(resolve_hookpoint(pipe, name).width)
    a = concept_steering(sae, pipe, name, "a cat", -2.0)
    b = concept_steering(sae, pipe, name, "a dog", -2.0)
    a.rows = family_gate(pipe, name, ["cat"], ["dog"], 0.5, implicit_from_step=1, detector=_FixedDetector(block, 0, [True]))
    b.rows = family_gate(pipe, name, ["dog"], ["cat"], 0.5, implicit_from_step=2)
    with pytest.raises(SteeringError, match="start at the same step"):
        with steer_text_encoder(pipe, [a, b]):
            pass
    assert _no_hooks(pipe) and not _ours(pipe)


def test_saeuron_detector_edits_only_the_flagged_samples_after_its_step(sd_dictionary):
    """A detector at step 0 flagging the first of two samples: that sample equals the edit restricted to
    steps 1-2 (no detector), the other is the plain image bit for bit; nothing flagged is the plain batch;
    the detector reads the unconditional rows once per generation; hooks are gone afterwards, also when
    the detector raises; a detector refuses the faithful path."""
    from diffusion_sae.interventions.ablate import ConceptEdit

    pipe, sae, d = sd_dictionary
    block = "unet.up_blocks.1.attentions.0"
    prompts = ["a cat", "a cat on a sofa"]
    base = _gen(pipe, prompts)
    with unlearn_concepts(pipe, sae, d, [ConceptEdit("cat", -20.0, top_n=3, window=(1, 3))]):
        windowed = _gen(pipe, prompts)
    assert (windowed - base).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    det = _FixedDetector(block, 0, [True, False])
    with unlearn_concepts(pipe, sae, d, [ConceptEdit("cat", -20.0, top_n=3, detector=det)]):
        out = _gen(pipe, prompts)
    assert det.seen == [2]
    torch.testing.assert_close(out[0], windowed[0], rtol=0, atol=1e-6)
    assert torch.equal(out[1], base[1])
    with unlearn_concepts(pipe, sae, d, [ConceptEdit("cat", -20.0, top_n=3, detector=_FixedDetector(block, 0, [False, False]))]):
        assert torch.equal(_gen(pipe, prompts), base)

    class Boom(_FixedDetector):
        def __call__(self, tokens):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with unlearn_concepts(pipe, sae, d, [ConceptEdit("cat", -20.0, top_n=3, detector=Boom(block, 0, [True]))]):
            _gen(pipe, prompts)
    with pytest.raises(DictionaryError, match="faithful=False"):
        with unlearn_concepts(pipe, sae, d, [ConceptEdit("cat", -1.0, top_n=3, detector=det)], faithful=True):
            pass
    with pytest.raises(DictionaryError, match="detector must be a callable"):
        ConceptEdit("cat", detector="probe")
    assert _no_hooks(pipe)


class _RecordingDetector(_FixedDetector):
    """Flags nothing and keeps the tokens it was shown; `branch` says which guidance half it reads."""

    def __init__(self, hookpoint, step, branch):
        super().__init__(hookpoint, step, [])
        self.branch, self.tokens = branch, []

    def __call__(self, tokens):
        self.tokens.append(tokens.clone())
        return torch.zeros(tokens.shape[0], dtype=torch.bool)


def test_saeuron_detectors_any_of_them_and_the_prompt_branch(sd_dictionary):
    """A tuple of detectors gates with "any": sample 0 flagged at step 0 equals the edit in steps 1-2, sample 1
    flagged at step 1 equals it in step 2 alone; a detector reading the conditional rows sees the prompt (two
    prompts at one seed differ), one reading the unconditional rows does not (equal); an empty tuple is refused."""
    from diffusion_sae.interventions.ablate import ConceptEdit

    pipe, sae, d = sd_dictionary
    block = "unet.up_blocks.1.attentions.0"
    prompts = ["a cat", "a cat on a sofa"]
    edits = {}
    for w in ((1, 3), (2, 3)):
        with unlearn_concepts(pipe, sae, d, [ConceptEdit("cat", -20.0, top_n=3, window=w)]):
            edits[w] = _gen(pipe, prompts)
    assert (edits[(1, 3)] - edits[(2, 3)]).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    dets = (_FixedDetector(block, 0, [True, False]), _FixedDetector(block, 1, [False, True]))
    with unlearn_concepts(pipe, sae, d, [ConceptEdit("cat", -20.0, top_n=3, detector=dets)]):
        out = _gen(pipe, prompts)
    torch.testing.assert_close(out[0], edits[(1, 3)][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], edits[(2, 3)][1], rtol=0, atol=1e-6)
    seen = {}
    for branch in ("uncond", "cond"):
        rec = _RecordingDetector(block, 0, branch)
        for p in ("a cat", "a dog on a sofa"):
            with unlearn_concepts(pipe, sae, d, [ConceptEdit("cat", -20.0, top_n=3, detector=rec)]):
                _gen(pipe, [p])
        seen[branch] = rec.tokens
    torch.testing.assert_close(seen["uncond"][0], seen["uncond"][1], rtol=0, atol=1e-6)
    assert (seen["cond"][0] - seen["cond"][1]).abs().max() > 1e-4
    with pytest.raises(DictionaryError, match="empty tuple"):
        ConceptEdit("cat", detector=())
    assert _no_hooks(pipe)


class _PrefixDetector(_FixedDetector):
    """Flags the first samples of `flags` for a batch of that many or fewer (a rewind's second pass is smaller)."""

    def __call__(self, tokens):
        self.seen.append(tokens.shape[0])
        return torch.tensor(self.flags[: tokens.shape[0]])


def _gens(n, first=0):
    return [torch.Generator().manual_seed(first + i) for i in range(n)]


def test_rewind_redoes_the_late_flagged_samples_with_the_whole_edit(sd_dictionary):
    """A detector at step 1 flags sample 0 of 2 with rewind=True: generate() gives sample 0 as the ungated edit
    draws it from its first latent, and sample 1 as the gated pass drew it (the plain image, bit for bit); one
    flagged at step 0 under a window from step 1 got the whole edit already and is not redone (one detector
    call); without a rewinding edit generate() is pipe(); bad set-ups get one clear error; nothing is left open."""
    from diffusion_sae.interventions.ablate import ConceptEdit
    from diffusion_sae.interventions.rewind import ACTIVE_GATES
    from diffusion_sae.interventions.rewind import RewindError, generate

    pipe, sae, d = sd_dictionary
    block = "unet.up_blocks.1.attentions.0"
    prompts = ["a cat", "a cat on a sofa"]
    kw = dict(num_inference_steps=3, guidance_scale=5.0, output_type="pt", height=32, width=32)
    plain = pipe(prompts, generator=_gens(2), **kw).images
    with unlearn_concepts(pipe, sae, d, [ConceptEdit("cat", -20.0, top_n=3)]):
        whole = pipe(prompts, generator=_gens(2), **kw).images
    assert (whole[0] - plain[0]).abs().max() > 1e-3
    det = _PrefixDetector(block, 1, [True, False])
    with unlearn_concepts(pipe, sae, d, [ConceptEdit("cat", -20.0, top_n=3, detector=det, rewind=True)]):
        gated = pipe(prompts, generator=_gens(2), **kw).images
        out = generate(pipe, prompts, generator=_gens(2), **kw).images
        with pytest.raises(RewindError, match="one per image"):
            generate(pipe, prompts, generator=torch.Generator().manual_seed(0), **kw)
    # the gated call, then generate's two passes (the second on sample 0 alone); the refused call generated nothing
    assert det.seen == [2, 2, 1]
    assert (gated[0] - whole[0]).abs().max() > 1e-3      # the late gate alone did not reach the whole edit
    torch.testing.assert_close(out[0], whole[0], rtol=0, atol=1e-5)
    assert torch.equal(out[1], plain[1]) and torch.equal(out[1], gated[1])
    early = _PrefixDetector(block, 0, [True, False])
    with unlearn_concepts(pipe, sae, d, [ConceptEdit("cat", -20.0, top_n=3, detector=early, window=(1, 3), rewind=True)]):
        a = pipe(prompts, generator=_gens(2), **kw).images
        b = generate(pipe, prompts, generator=_gens(2), **kw).images
    assert early.seen == [2, 2] and torch.equal(a, b)
    assert torch.equal(generate(pipe, prompts, generator=_gens(2), **kw).images, plain)
    with pytest.raises(DictionaryError, match="give the edit a detector"):
        ConceptEdit("cat", rewind=True)
    assert _no_hooks(pipe) and pipe not in ACTIVE_GATES


def test_rewind_with_several_images_per_prompt_and_numpy_output(sd_dictionary):
    """One prompt, two images (num_images_per_prompt=2), the second flagged late: generate() redoes that image alone
    from its own generator, and the first stays the plain one; numpy output is merged the same way."""
    from diffusion_sae.interventions.ablate import ConceptEdit
    from diffusion_sae.interventions.rewind import generate

    pipe, sae, d = sd_dictionary
    block = "unet.up_blocks.1.attentions.0"
    kw = dict(num_inference_steps=3, guidance_scale=5.0, height=32, width=32, num_images_per_prompt=2)
    plain = pipe("a cat", generator=_gens(2, 7), output_type="np", **kw).images
    with unlearn_concepts(pipe, sae, d, [ConceptEdit("cat", -20.0, top_n=3)]):
        whole = pipe("a cat", generator=_gens(2, 7), output_type="np", **kw).images
    det = _PrefixDetector(block, 1, [False, True])
    with unlearn_concepts(pipe, sae, d, [ConceptEdit("cat", -20.0, top_n=3, detector=det, rewind=True)]):
        out = generate(pipe, "a cat", generator=_gens(2, 7), output_type="np", **kw).images
    assert det.seen == [2, 1] and out.shape == plain.shape
    assert (out[0] == plain[0]).all()
    assert abs(out[1] - whole[1]).max() < 1e-4 and abs(whole[1] - plain[1]).max() > 1e-3


def test_steering_rewind_redoes_the_flagged_samples_from_the_first_step(pipes):
    """FamilyGate(rewind=True), a detector at step 1 of 3 (k=2) flagging sample 0 of 2 prompts naming neither
    concept: generate() gives sample 0 as the implicit fraction from step 0 draws it (no detector) and sample 1 as
    the gated pass drew it (implicit 0), bit for bit; the second pass runs on sample 0 alone; a rewind without a
    detector is refused; a CS rewind and a SAeUron-free pipeline leave nothing open."""
    from diffusion_sae.interventions.rewind import ACTIVE_GATES, generate
    from diffusion_sae.interventions.steer import FamilyGate, family_gate

    pipe = pipes("sd")
    block = "unet.up_blocks.1.attentions.0"
    name = list_hookpoints(pipe, "text")[-2]
    st = concept_steering(_sae(resolve_hookpoint(pipe, name).width), pipe, name, "a cat", -2.0)
    prompts = ["a photo of a car", "a photo of a tree"]
    kw = dict(num_inference_steps=3, guidance_scale=5.0, output_type="pt", height=32, width=32)

    def gate(**g):
        out = st.scaled(1.0)
        out.rows = family_gate(pipe, name, ["cat"], ["dog"], 1.0, **g)
        return out
    with steer_text_encoder(pipe, gate()):
        whole = pipe(prompts, generator=_gens(2), **kw).images
    with steer_text_encoder(pipe, gate(implicit_from_step=3)):
        zero = pipe(prompts, generator=_gens(2), **kw).images     # the fraction never acts within 3 steps
    assert (whole - zero).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    det = _PrefixDetector(block, 1, [True, False])
    with steer_text_encoder(pipe, gate(implicit_from_step=2, detector=det, rewind=True)):
        gated = pipe(prompts, generator=_gens(2), **kw).images
        assert pipe in ACTIVE_GATES
        out = generate(pipe, prompts, generator=_gens(2), **kw).images
    assert det.seen == [2, 2, 1]
    assert (gated[0] - whole[0]).abs().max() > 1e-3      # from step 2 alone the fraction did not reach it
    torch.testing.assert_close(out[0], whole[0], rtol=0, atol=1e-5)
    assert torch.equal(out[1], gated[1])
    torch.testing.assert_close(out[1], zero[1], rtol=0, atol=1e-6)
    # rewind_from_step=1: the redo gets the fraction from step 1, as the gate without a detector from step 1 does
    with steer_text_encoder(pipe, gate(implicit_from_step=1)):
        from_one = pipe(prompts, generator=_gens(2), **kw).images
    det = _PrefixDetector(block, 1, [True, False])
    with steer_text_encoder(pipe, gate(implicit_from_step=2, detector=det, rewind=True, rewind_from_step=1)):
        later = generate(pipe, prompts, generator=_gens(2), **kw).images
    assert (from_one[0] - whole[0]).abs().max() > 1e-3
    torch.testing.assert_close(later[0], from_one[0], rtol=0, atol=1e-5)
    assert torch.equal(later[1], gated[1])
    with pytest.raises(SteeringError, match="give the gate a detector"):
        FamilyGate([(1,)], [(2,)], 0.5, implicit_from_step=2, rewind=True)
    with pytest.raises(SteeringError, match="rewind_from_step=2 must be below"):
        FamilyGate([(1,)], [(2,)], 0.5, implicit_from_step=2, detector=det, rewind=True, rewind_from_step=2)
    assert _no_hooks(pipe) and not _ours(pipe) and pipe not in ACTIVE_GATES


def test_detector_gate_tuple_flags_any_of_its_detectors(pipes):
    """A tuple of detectors at steps 0 and 1 (k=2): a sample flagged at either step equals the gate without a
    detector, one flagged by neither equals implicit 0 (the verdict of step 1 adds to step 0's, it does not
    replace it); an empty tuple is refused."""
    pipe, block, prompts, under, zero, late = _two_unnamed(pipes, 2)
    both = _detected(pipe, (_FixedDetector(block, 0, [True, False]), _FixedDetector(block, 1, [False, True])),
                     prompts, k=2)
    torch.testing.assert_close(both, late, rtol=0, atol=1e-6)
    first = _detected(pipe, (_FixedDetector(block, 0, [True, False]), _FixedDetector(block, 1, [False, False])),
                      prompts, k=2)
    torch.testing.assert_close(first[0], late[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(first[1], zero[1], rtol=0, atol=1e-6)
    with pytest.raises(SteeringError, match="empty tuple"):
        _detected(pipe, (), prompts, k=2)
    assert _no_hooks(pipe) and not _ours(pipe)


def test_family_gate_detector_reads_its_branch(pipes):
    """FamilyGate's detector hook passes a cond-branch detector the conditional half of the batch: the prompt
    moves what it sees at step 0, where the unconditional half is the same for two prompts at one seed."""
    pipe = pipes("sd")
    block = "unet.up_blocks.1.attentions.0"
    seen = {}
    for branch in ("uncond", "cond"):
        rec = _RecordingDetector(block, 0, branch)
        for p in ("a photo of a car", "a photo of a tree"):
            _detected(pipe, rec, [p])
        seen[branch] = rec.tokens
    torch.testing.assert_close(seen["uncond"][0], seen["uncond"][1], rtol=0, atol=1e-6)
    assert (seen["cond"][0] - seen["cond"][1]).abs().max() > 1e-4


def test_detector_gates_stack_one_after_another(pipes):
    """Two detector-gated removals stacked as separate contexts (a user erasing one concept after another):
    a sample neither flags is generated as with both implicit fractions at 0 (here: the plain image, since
    neither prompt names a family word), a sample either flags moves; hooks are gone afterwards."""
    import contextlib

    from diffusion_sae.interventions.steer import family_gate

    pipe = pipes("sd")
    block = "unet.up_blocks.1.attentions.0"
    name = list_hookpoints(pipe, "text")[-2]
    sae = _sae(resolve_hookpoint(pipe, name).width)
    prompts = ["a photo of a car", "a photo of a tree"]
    plain = _gen(pipe, prompts)
    sts = []
    for word, rival, flags in (("cat", "dog", [True, False]), ("bird", "fish", [False, False])):
        st = concept_steering(sae, pipe, name, f"a {word}", -2.0)
        st.rows = family_gate(pipe, name, [word], [rival], 1.0, implicit_from_step=1,
                              detector=_FixedDetector(block, 0, flags))
        sts.append(st)
    with contextlib.ExitStack() as stack:
        for st in sts:
            stack.enter_context(steer_text_encoder(pipe, st))
        out = _gen(pipe, prompts)
    torch.testing.assert_close(out[1], plain[1], rtol=0, atol=1e-6)
    assert (out[0] - plain[0]).abs().max() > 1e-3
    assert _no_hooks(pipe) and not _ours(pipe)


def test_delayed_gates_stacked_equal_the_same_gates_in_one_context(pipes):
    """Two FamilyGates with implicit_from_step stacked as separate contexts generate exactly what one context
    holding both does (a negative-only encode call of the inner wrapper reuses the mask of its own step: before
    the fix, the early encoding's negative branch got the late mask)."""
    import contextlib

    from diffusion_sae.interventions.steer import family_gate

    pipe = pipes("sd")
    name = list_hookpoints(pipe, "text")[-2]
    sae = _sae(resolve_hookpoint(pipe, name).width)
    prompts = ["a photo of a car", "a photo of a tree"]
    plain = _gen(pipe, prompts)
    for k in (1, 5):
        sts = []
        for word, rival in (("cat", "dog"), ("bird", "fish")):
            st = concept_steering(sae, pipe, name, f"a {word}", -2.0)
            st.rows = family_gate(pipe, name, [word], [rival], 1.0, implicit_from_step=k)
            sts.append(st)
        with contextlib.ExitStack() as stack:
            for st in sts:
                stack.enter_context(steer_text_encoder(pipe, st))
            stacked = _gen(pipe, prompts)
        with steer_text_encoder(pipe, sts):
            together = _gen(pipe, prompts)
        torch.testing.assert_close(stacked, together, rtol=0, atol=1e-6)
        if k == 5:     # past the last of 3 steps: neither prompt names a family word, so the plain images
            torch.testing.assert_close(stacked, plain, rtol=0, atol=1e-6)
        else:
            assert (stacked - plain).abs().max() > 1e-3
    assert _no_hooks(pipe) and not _ours(pipe)
