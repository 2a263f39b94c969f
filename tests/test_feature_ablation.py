"""Per-position ablation of a concept's text-SAE features (steer.FeatureAblation) on a tiny SD 1.x pipeline."""
import pytest
import torch

from _tiny import tiny
from diffusion_sae.configs import ConfigError, SteeringConfig
from diffusion_sae.interventions.api import ConceptSteering, intervene
from diffusion_sae.interventions.steer import (FeatureAblation, SteeringError, concept_feature_ablation,
                                               concept_steering, layer_activations, steer_text_encoder)
from diffusion_sae.models import resolve_hookpoint
from diffusion_sae.sae import TopKSAE

NAME = "text_encoder.text_model.encoder.layers.9"


@pytest.fixture(scope="module")
def pipe():
    p = tiny("sd")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def sae(pipe):
    torch.manual_seed(0)
    return TopKSAE(resolve_hookpoint(pipe, NAME).width, 4 * resolve_hookpoint(pipe, NAME).width, 8)


def _encoded(pipe, prompt):
    """The prompt branch's encoder output as the pipeline hands it to the UNet."""
    emb, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    return emb


def test_ablation_subtracts_exactly_the_features_reading_at_every_position(pipe, sae):
    h = layer_activations(pipe, NAME, ["a photo of a striped cat", "a dog"])
    feats = torch.tensor([3, 11, 40])
    ab = FeatureAblation(sae, NAME, feats, scale=1.5)
    # by hand: only the chosen latents of the dense ReLU code, decoded without the bias
    z = torch.relu((h - sae.b_dec) @ sae.W_enc.t() + sae.b_enc)
    keep = torch.zeros(sae.cfg.num_latents)
    keep[feats] = 1.0
    want = 1.5 * (z * keep) @ sae.W_dec
    torch.testing.assert_close(ab(h), want.detach(), atol=1e-5, rtol=1e-4)
    # a feature that never fires takes nothing out: the ablation follows the SAE's reading, not the position
    import copy
    quiet = copy.deepcopy(sae)
    with torch.no_grad():
        quiet.b_enc[feats] = -1e4
    assert FeatureAblation(quiet, NAME, feats)(h).abs().max() == 0
    # a ceiling keeps each feature's activation up to it and takes out only the excess
    ceiling = torch.tensor([0.0, 0.5, 1e4])
    want = (torch.relu(z[..., feats] - ceiling) @ sae.W_dec[feats]).detach()
    torch.testing.assert_close(FeatureAblation(sae, NAME, feats, ceiling=ceiling)(h), want, atol=1e-5, rtol=1e-4)
    with pytest.raises(SteeringError, match="ceiling"):
        FeatureAblation(sae, NAME, feats, ceiling=torch.tensor([0.0, -1.0, 0.0]))


def test_ablation_changes_the_encoding_and_hooks_go_away_even_on_error(pipe, sae):
    st = concept_steering(sae, pipe, NAME, "a striped cat", 0.0)   # λ = 0: only the ablation acts
    plain = _encoded(pipe, "a photo of a striped cat")
    st.ablation = concept_feature_ablation(sae, pipe, NAME, ["a striped cat", "striped"], ["a cat", ""], n_features=8)
    with steer_text_encoder(pipe, st):
        ablated = _encoded(pipe, "a photo of a striped cat")
    assert (ablated - plain).abs().max() > 1e-4
    # an S of 0 with the ablation at scale 0+: the change is the ablation's own, linear in its scale
    st2 = concept_steering(sae, pipe, NAME, "a striped cat", 0.0)
    st2.ablation = FeatureAblation(sae, NAME, st.ablation.features, scale=2.0)
    with steer_text_encoder(pipe, st2):
        twice = _encoded(pipe, "a photo of a striped cat")
    # the layer is not the last: the change passes through later layers, so compare directions loosely
    d1, d2 = (ablated - plain).flatten(), (twice - plain).flatten()
    assert torch.nn.functional.cosine_similarity(d1, d2, dim=0) > 0.9 and d2.norm() > 1.5 * d1.norm()
    with pytest.raises(RuntimeError, match="boom"):
        with steer_text_encoder(pipe, st):
            raise RuntimeError("boom")
    torch.testing.assert_close(_encoded(pipe, "a photo of a striped cat"), plain, atol=0, rtol=0)


def test_concept_features_are_the_ones_the_concept_prompts_light_up(pipe, sae):
    ab = concept_feature_ablation(sae, pipe, NAME, ["a striped cat", "a striped dog"], ["a cat", "a dog"], n_features=5)
    code = lambda ps: sae.pre_acts(layer_activations(pipe, NAME, ps)).mean((0, 1))  # noqa: E731
    diff = (code(["a striped cat", "a striped dog"]) - code(["a cat", "a dog"])).detach()
    assert set(ab.features.tolist()) == set(diff.topk(5).indices.tolist())
    assert float(diff[ab.features].min()) >= float(diff.sort(descending=True).values[4]) - 1e-6
    # with a ceiling: each feature's ceiling is the contrast tokens' quantile, the ranking the excess over it
    capped = concept_feature_ablation(sae, pipe, NAME, ["a striped cat", "a striped dog"], ["a cat", "a dog"],
                                      n_features=5, ceiling_quantile=0.9)
    flat = lambda ps: sae.pre_acts(layer_activations(pipe, NAME, ps)).flatten(0, 1).detach()  # noqa: E731
    level = flat(["a cat", "a dog"]).quantile(0.9, dim=0)
    excess = torch.relu(flat(["a striped cat", "a striped dog"]) - level).mean(0)
    assert set(capped.features.tolist()) == set(excess.topk(5).indices.tolist())
    torch.testing.assert_close(capped.ceiling, level[capped.features])


def test_ablation_bad_inputs(pipe, sae):
    with pytest.raises(SteeringError, match="out of range"):
        FeatureAblation(sae, NAME, [sae.cfg.num_latents])
    with pytest.raises(SteeringError, match="no features"):
        FeatureAblation(sae, NAME, [])
    with pytest.raises(SteeringError, match="n_features"):
        concept_feature_ablation(sae, pipe, NAME, ["a cat"], [""], n_features=0)
    with pytest.raises(SteeringError, match="contrast prompts"):
        concept_feature_ablation(sae, pipe, NAME, ["a cat"], [], n_features=4)
    with pytest.raises(SteeringError, match="one layer"):
        concept_feature_ablation(sae, pipe, [NAME, "text_encoder.text_model.encoder.layers.8"], ["a cat"], [""])
    with pytest.raises(ConfigError, match="ablate_features"):
        SteeringConfig(concept="cat", ablate_features=0)
    with pytest.raises(ConfigError, match="ablate_scale only acts"):
        SteeringConfig(concept="cat", ablate_scale=2.0)
    with pytest.raises(ConfigError, match="ablate_scale must be > 0"):
        SteeringConfig(concept="cat", ablate_features=4, ablate_scale=-1.0)
    with pytest.raises(ConfigError, match="ablate_ceiling only acts"):
        SteeringConfig(concept="cat", ablate_ceiling=0.99)
    with pytest.raises(ConfigError, match="quantile"):
        SteeringConfig(concept="cat", ablate_features=4, ablate_ceiling=1.5)
    with pytest.raises(SteeringError, match="ceiling_quantile"):
        concept_feature_ablation(sae, pipe, NAME, ["a cat"], [""], n_features=4, ceiling_quantile=2.0)


def test_config_turns_the_ablation_on_and_it_round_trips(pipe, sae, tmp_path):
    cfg = SteeringConfig(concept="a striped cat", strength=-1.0, hookpoint=NAME, baseline="a cat", ablate_features=6,
                         ablate_scale=1.5, ablate_ceiling=0.9)
    assert SteeringConfig.from_json(cfg.to_json(tmp_path / "c.json")) == cfg
    iv = ConceptSteering(sae, cfg)
    st = iv.steering(pipe)
    assert isinstance(st.ablation, FeatureAblation) and len(st.ablation.features) == 6 and st.ablation.scale == 1.5
    assert bool((st.ablation.ceiling > 0).any())     # the baseline's 0.9-quantile
    without = ConceptSteering(sae, concept="a striped cat", strength=-1.0, hookpoint=NAME, baseline="a cat")
    with intervene(pipe, without):
        a = _encoded(pipe, "a photo of a striped cat")
    with intervene(pipe, iv):
        b = _encoded(pipe, "a photo of a striped cat")
    assert (a - b).abs().max() > 1e-4


def test_gated_ablation_leaves_prompts_that_do_not_name_the_concept_bit_for_bit(pipe, sae):
    """With a family gate the ablation acts only where the prompt names the concept: a rival's prompt and a prompt
    naming none of the family are encoded exactly as without it."""
    kw = dict(concept="a striped cat", strength=-1.0, hookpoint=NAME, baseline="a cat", concept_words=("striped",),
              rivals=("dotted",), implicit=0.5, match="tokens")
    gated, plain = ConceptSteering(sae, **kw, ablate_features=8), ConceptSteering(sae, **kw)
    prompts = ["a photo of a striped cat", "a photo of a dotted cat", "a photo of a cat"]
    with intervene(pipe, plain):
        want = [_encoded(pipe, p) for p in prompts]
    with intervene(pipe, gated):
        got = [_encoded(pipe, p) for p in prompts]
    assert (got[0] - want[0]).abs().max() > 1e-4
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    # in one batch too (the rows' masks come from the batch's own token ids)
    with intervene(pipe, gated):
        batch = _encoded(pipe, prompts)
    torch.testing.assert_close(batch, torch.cat(got), atol=1e-5, rtol=1e-5)


def test_shipped_removal_with_ablate_params_changes_only_prompts_naming_the_concept():
    """On the bundled model, params "ablate" {kind: n} gives each removal the concept's n text-SAE features, taken
    out only where the prompt names the concept (the shipped family gate's target rows, a held-out name included
    when the embedding matcher reads it as the concept)."""
    from diffusion_sae.eval.shapes import removal_steering, steer_strength
    from diffusion_sae.world import assets, bundle

    pipe = assets.load_pipeline()
    text_sae, shipped = bundle.load_text_sae(), bundle.load_params()["steer"]
    assert shipped.get("ablate", {}).get("object") == 16      # the shipped removal ablates 16 features
    shipped = {k: v for k, v in shipped.items() if k != "ablate"}
    cs = dict(shipped, ablate={"object": 16})
    st = removal_steering(text_sae, pipe, "object", "square", steer_strength(cs, "object", "square"), cs)
    assert isinstance(st.ablation, FeatureAblation) and len(st.ablation.features) == 16
    st0 = removal_steering(text_sae, pipe, "object", "square", steer_strength(shipped, "object", "square"), shipped)
    prompts = ["a red square in striped style", "a red circle in striped style", "a red thing in striped style"]

    def enc(s):
        with steer_text_encoder(pipe, s):
            return pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    a, b = enc(st), enc(st0)
    assert (a[0] - b[0]).abs().max() > 1e-2
    assert torch.equal(a[1:], b[1:])
    # no entry for the kind: no ablation
    assert removal_steering(text_sae, pipe, "style", "striped", steer_strength(cs, "style", "striped"), cs).ablation is None


def test_ablation_everywhere_ignores_the_gate(pipe, sae):
    kw = dict(concept="a striped cat", strength=-1.0, hookpoint=NAME, baseline="a cat", concept_words=("striped",),
              rivals=("dotted",), match="tokens")
    plain = ConceptSteering(sae, **kw)
    with intervene(pipe, plain):
        want = _encoded(pipe, "a photo of a dotted cat")
    iv = ConceptSteering(sae, **kw, ablate_features=8)
    iv.steering(pipe).ablation.everywhere = True
    with intervene(pipe, iv):
        assert (_encoded(pipe, "a photo of a dotted cat") - want).abs().max() > 1e-4
