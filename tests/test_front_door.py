"""`import diffusion_sae as ds`: lazy names, typed configs, and apply / remove / intervene on the bundled pipeline."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import diffusion_sae as ds
from diffusion_sae.configs import ConfigError, SAeUronConfig, SteeringConfig
from diffusion_sae.interventions.api import InterventionError
from diffusion_sae.world import bundle

PROMPT = ["a red star in striped style", "a blue heart in striped style"]
STEPS = bundle.STEPS  # SAeUron's dictionaries are built on this step grid


@pytest.fixture(scope="module")
def shapes():
    pipe = ds.load_shapescanvas()
    return pipe, ds.load_sae(ds.shapescanvas_sae_dir() / bundle.TEXT_HOOKPOINT)


def _gen(pipe, steps=10):
    g = [torch.Generator().manual_seed(s) for s in range(len(PROMPT))]
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=5.0, generator=g, output_type="pt").images


def _registered(pipe) -> list[str]:
    """Every hook left on the text encoder and UNet: diffusers registry names and torch hooks (except the
    output-capturing hooks transformers installs for good when hidden states are asked for)."""
    mods = [m for comp in (pipe.text_encoder, pipe.unet) for m in comp.modules()]
    torch_hooks = [getattr(h, "__qualname__", repr(h)) for m in mods
                   for h in list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values())]
    return [n for m in mods if hasattr(m, "_diffusers_hook") for n in m._diffusers_hook.hooks] + \
        [q for q in torch_hooks if "output_capturing_hook" not in q]


def test_import_is_cheap_and_lazy():
    # A fresh interpreter: importing the package loads neither torch nor the world, and names resolve on use.
    code = ("import sys, diffusion_sae as ds; heavy = [m for m in ('torch', 'diffusers', 'diffusion_sae.world') "
            "if m in sys.modules]; print(heavy); print(ds.SteeringConfig.__module__, ds.apply.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "diffusion_sae.configs diffusion_sae.interventions.api"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ds.nope  # noqa: B018
    assert {"load_sae", "ConceptSteering", "SAeUron", "apply", "remove", "intervene", "collect", "Trainer",
            "build_concept_dictionary", "evaluate"} <= set(dir(ds))


def test_front_door_names_point_at_the_library():
    from diffusion_sae.activations.collect import collect
    from diffusion_sae.concepts.dictionary import build_concept_dictionary
    from diffusion_sae.sae.io import load_sae
    from diffusion_sae.sae.train import SAETrainer

    from diffusion_sae.eval.shapes import run_shapes_benchmark

    assert ds.load_sae is load_sae and ds.collect is collect and ds.Trainer is SAETrainer
    assert ds.build_concept_dictionary is build_concept_dictionary and ds.evaluate is run_shapes_benchmark


def test_configs_round_trip_and_reject_bad_values(tmp_path):
    s = SteeringConfig(concept="striped style", strength=-2, baseline="", keep=["circle", "red"], gate="striped")
    assert s.concept == ("striped style",) and s.keep == ("circle", "red") and s.strength == -2.0
    d = s.to_dict()
    assert d["schema_version"] == 1 and d["kind"] == "steering"
    assert SteeringConfig.from_dict(json.loads(json.dumps(d))) == s
    u = SAeUronConfig(concepts="star", multiplier=-10, top_n=2, scaling="latent", selection="specific")
    assert SAeUronConfig.from_json(u.to_json(tmp_path / "u.json")) == u
    with pytest.raises(ConfigError, match="scaling must be one of 'mean', 'latent'"):
        SAeUronConfig(concepts="star", scaling="log")
    with pytest.raises(ConfigError, match="mode must be one of"):
        SAeUronConfig(concepts="star", mode="erase")
    with pytest.raises(ConfigError, match="min_fire"):
        SAeUronConfig(concepts="star", min_fire=0)
    with pytest.raises(ConfigError, match="no field 'strenght'"):
        SteeringConfig.from_dict({"concept": "x", "strenght": 1})
    with pytest.raises(ConfigError, match="cannot be read as SAeUronConfig"):
        SAeUronConfig.from_dict(d)
    with pytest.raises(ConfigError, match="schema_version 2"):
        SteeringConfig.from_dict({**d, "schema_version": 2})


def test_family_gate_and_window_settings_round_trip_and_are_checked(tmp_path):
    s = SteeringConfig(concept="a cat", strength=-2, concept_words="cat", rivals=["dog", "horse"], implicit=0.5,
                       implicit_negative=1, match="tokens")
    assert s.rivals == ("dog", "horse") and s.concept_words == ("cat",) and s.implicit_negative == 1.0
    d = json.loads(json.dumps(s.to_dict()))
    assert d["rivals"] == ["dog", "horse"] and d["match"] == "tokens"
    assert SteeringConfig.from_dict(d) == s
    assert SteeringConfig.from_json(s.to_json(tmp_path / "s.json")) == s
    with pytest.raises(ConfigError, match="gate and rivals are exclusive"):
        SteeringConfig(concept="a cat", gate="cat", concept_words="cat", rivals="dog")
    with pytest.raises(ConfigError, match="rivals needs concept_words"):
        SteeringConfig(concept="a cat", rivals="dog")
    with pytest.raises(ConfigError, match="implicit only acts with rivals"):
        SteeringConfig(concept="a cat", implicit=0.5)
    with pytest.raises(ConfigError, match="implicit_negative must be a finite number"):
        SteeringConfig(concept="a cat", concept_words="cat", rivals="dog", implicit_negative=float("inf"))
    with pytest.raises(ConfigError, match="match must be one of 'tokens', 'embedding'"):
        SteeringConfig(concept="a cat", concept_words="cat", rivals="dog", match="fuzzy")
    u = SAeUronConfig(concepts="star", window=[5, 25])
    assert u.window == (5, 25) and u.to_dict()["window"] == [5, 25]
    assert SAeUronConfig.from_json(u.to_json(tmp_path / "u.json")) == u
    for bad in ((3, 1), (5,), (-1, 2), (0.0, 2), "5-25"):
        with pytest.raises(ConfigError, match="window must be two step indices"):
            SAeUronConfig(concepts="star", window=bad)


def test_detector_settings_round_trip_and_are_checked(tmp_path):
    folder = bundle.probe_dir("style", 7)
    s = SteeringConfig(concept="striped style", concept_words="striped", rivals=["dotted", "solid"], implicit=0.2,
                       implicit_from_step=8, detector=folder, detector_threshold=0.7)
    assert s.detector == str(folder) and s.detector_threshold == 0.7     # a Path is kept as its text
    d = json.loads(json.dumps(s.to_dict()))
    assert d["detector"] == str(folder) and d["detector_threshold"] == 0.7
    assert SteeringConfig.from_dict(d) == s
    assert SteeringConfig.from_json(s.to_json(tmp_path / "s.json")) == s
    gate = dict(concept="a cat", concept_words="cat", rivals="dog", implicit=0.5)
    with pytest.raises(ConfigError, match="detector needs implicit_from_step >= 1"):
        SteeringConfig(**gate, detector="probe")
    with pytest.raises(ConfigError, match="detector only acts with rivals"):
        SteeringConfig(concept="a cat", detector="probe")
    with pytest.raises(ConfigError, match="detector_threshold only acts with rivals"):
        SteeringConfig(concept="a cat", detector_threshold=0.7)
    with pytest.raises(ConfigError, match="detector_threshold only acts with detector"):
        SteeringConfig(**gate, implicit_from_step=2, detector_threshold=0.7)
    for bad in (1.5, -0.1, float("nan"), True, "high"):
        with pytest.raises(ConfigError, match="detector_threshold must be"):
            SteeringConfig(**gate, implicit_from_step=2, detector="probe", detector_threshold=bad)
    for bad in ("", "  ", 3):
        with pytest.raises(ConfigError, match="detector must be the folder of a saved ConceptProbe"):
            SteeringConfig(**gate, implicit_from_step=2, detector=bad)


def test_front_door_detector_gate_equals_family_gate_with_the_probe(shapes):
    """SteeringConfig.detector (the shipped style probe at step 7) through ConceptSteering is family_gate with that
    probe's detector for the concept word, bit for bit; each sample is either the gate without a detector or the
    implicit fraction at 0. A probe without any of concept_words, or no probe, fails on apply."""
    from diffusion_sae.concepts.probe import ConceptProbe, ProbeError, pooled_activations
    from diffusion_sae.interventions.steer import concept_steering, family_gate, steer_text_encoder

    pipe, sae = shapes
    folder = bundle.probe_dir("style", 7)
    rivals = ["solid", "dotted", "checkered", "outlined", "gradient", "noisy", "wavy"]
    prompts = ["a red star", "a blue heart", "a green ring"]
    gate = dict(concept="striped style", strength=-2.0, concept_words=["stripes", "striped"], rivals=rivals,
                implicit=1.0, implicit_from_step=8, match="tokens")

    def gen():
        g = [torch.Generator().manual_seed(s) for s in range(len(prompts))]
        return pipe(prompts, num_inference_steps=STEPS, guidance_scale=2.0, generator=g, output_type="pt").images

    def direct(**kw):
        st = concept_steering(sae, pipe, bundle.TEXT_HOOKPOINT, "striped style", -2.0)
        st.rows = family_gate(pipe, bundle.TEXT_HOOKPOINT, ["stripes", "striped"], rivals, 1.0, match="tokens", **kw)
        with steer_text_encoder(pipe, st):
            return gen()

    # before step 8 these prompts are generated unsteered, so the probe sees the plain model's step 7: a bar
    # between its lowest and highest p(striped) flags some of the samples and not others
    probe = ConceptProbe.from_pretrained(folder)
    p = probe.probabilities(pooled_activations(pipe, probe.hookpoint, prompts, list(range(len(prompts))), 7,
                                               steps=STEPS, guidance=2.0))[:, probe.index("striped")]
    bar = float(p.min() + p.max()) / 2
    flagged = (p >= bar).tolist()
    assert any(flagged) and not all(flagged), p
    want = direct(implicit_from_step=8, detector=probe.detector("striped", bar))
    with ds.intervene(pipe, ds.ConceptSteering(sae, **gate, detector=str(folder), detector_threshold=bar)):
        got = gen()
    assert torch.equal(got, want)
    late, zero = direct(implicit_from_step=8), gen()
    for i, f in enumerate(flagged):
        assert (late[i] - zero[i]).abs().max() > 1e-3
        assert torch.equal(got[i], late[i] if f else zero[i]), i
    with pytest.raises(InterventionError, match="none of concept_words .cat."):
        ds.apply(pipe, ds.ConceptSteering(sae, **{**gate, "concept_words": "cat"}, detector=str(folder)))
    with pytest.raises(ProbeError, match="no concept probe at"):
        ds.apply(pipe, ds.ConceptSteering(sae, **gate, detector=str(folder.parent / "nope")))
    assert ds.applied(pipe) == [] and _registered(pipe) == []


def test_several_detector_folders_round_trip_and_their_thresholds_are_counted(tmp_path):
    """detector may list folders (kept as a tuple) and detector_threshold one number for all or one per folder."""
    image, prompt = bundle.probe_dir("style", 7), bundle.probe_dir("style", 0, branch="cond")
    gate = dict(concept="striped style", concept_words="striped", rivals=["dotted", "solid"], implicit=0.2,
                implicit_from_step=8)
    s = SteeringConfig(**gate, detector=[image, prompt], detector_threshold=[0.2, 0.6])
    assert s.detector == (str(image), str(prompt)) and s.detector_threshold == (0.2, 0.6)
    assert s.detector_settings() == [(str(image), 0.2), (str(prompt), 0.6)]
    d = json.loads(json.dumps(s.to_dict()))
    assert d["detector"] == [str(image), str(prompt)] and d["detector_threshold"] == [0.2, 0.6]
    assert SteeringConfig.from_dict(d) == s
    assert SteeringConfig.from_json(s.to_json(tmp_path / "s.json")) == s
    one = SteeringConfig(**gate, detector=(image, prompt), detector_threshold=0.3)
    assert one.detector_settings() == [(str(image), 0.3), (str(prompt), 0.3)]
    assert SteeringConfig(**gate, detector=image).detector_settings() == [(str(image), 0.5)]
    single = SteeringConfig(**gate, detector=[image], detector_threshold=[0.4])   # a list of one is the one folder
    assert (single.detector, single.detector_threshold) == (str(image), 0.4)
    for bad in ([0.2], [0.2, 0.3, 0.4], []):
        with pytest.raises(ConfigError, match=f"lists {len(bad)} thresholds? for 2 detector folders"):
            SteeringConfig(**gate, detector=[image, prompt], detector_threshold=bad)
    with pytest.raises(ConfigError, match="detector_threshold must be a probability"):
        SteeringConfig(**gate, detector=[image, prompt], detector_threshold=[0.2, 1.5])
    with pytest.raises(ConfigError, match="detector is an empty list"):
        SteeringConfig(**gate, detector=[])
    with pytest.raises(ConfigError, match="detector must be the folder of a saved ConceptProbe .* not ''"):
        SteeringConfig(**gate, detector=[image, ""])
    with pytest.raises(ConfigError, match="detector_threshold only acts with detector"):
        SteeringConfig(**gate, detector_threshold=[0.2, 0.6])


def test_front_door_two_detector_folders_equal_family_gate_with_the_tuple(shapes):
    """SteeringConfig.detector with two folders (the shipped image-side style probe at step 7 and the prompt's-branch
    one at step 0), each with its threshold, through ConceptSteering is family_gate with the tuple of their detectors
    (up to float tolerance)."""
    from diffusion_sae.concepts.probe import ConceptProbe
    from diffusion_sae.interventions.steer import concept_steering, family_gate, steer_text_encoder

    pipe, sae = shapes
    folders = [bundle.probe_dir("style", 7), bundle.probe_dir("style", 0, branch="cond")]
    rivals = ["solid", "dotted", "checkered", "outlined", "gradient", "noisy", "wavy"]
    prompts = ["a red star", "a blue heart in striped style"]
    gate = dict(concept="striped style", strength=-2.0, concept_words=["stripes", "striped"], rivals=rivals,
                implicit=1.0, implicit_from_step=8, match="tokens")

    def gen():
        g = [torch.Generator().manual_seed(s) for s in range(len(prompts))]
        return pipe(prompts, num_inference_steps=STEPS, guidance_scale=2.0, generator=g, output_type="pt").images

    probes = [ConceptProbe.from_pretrained(f) for f in folders]
    dets = (probes[0].detector("striped", 0.3), probes[1].detector("striped", 0.6))
    st = concept_steering(sae, pipe, bundle.TEXT_HOOKPOINT, "striped style", -2.0)
    st.rows = family_gate(pipe, bundle.TEXT_HOOKPOINT, ["stripes", "striped"], rivals, 1.0, match="tokens",
                          implicit_from_step=8, detector=dets)
    with steer_text_encoder(pipe, st):
        want = gen()
    iv = ds.ConceptSteering(sae, **gate, detector=[str(f) for f in folders], detector_threshold=[0.3, 0.6])
    with ds.intervene(pipe, iv):
        got = gen()
    rows = iv.steering(pipe).rows
    assert [(d.step, d.branch, d.threshold) for d in rows.detectors] == [(7, "uncond", 0.3), (0, "cond", 0.6)]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert ds.applied(pipe) == [] and _registered(pipe) == []


def test_named_late_setting_round_trips_and_is_checked(tmp_path):
    folder = bundle.probe_dir("style", 7)
    gate = dict(concept="striped style", concept_words="striped", rivals=["dotted", "solid"], implicit=0.2)
    s = SteeringConfig(**gate, implicit_from_step=8, detector=folder, named_late=4)
    assert s.named_late == 4.0 and isinstance(s.named_late, float)
    assert SteeringConfig(**gate, implicit_from_step=8, detector=folder).named_late is None
    d = json.loads(json.dumps(s.to_dict()))
    assert d["named_late"] == 4.0
    assert SteeringConfig.from_dict(d) == s
    assert SteeringConfig.from_json(s.to_json(tmp_path / "s.json")) == s
    for bad in (0, 0.0, -1.0, -4):
        with pytest.raises(ConfigError, match="named_late must be a factor > 0"):
            SteeringConfig(**gate, implicit_from_step=8, detector=folder, named_late=bad)
    for bad in (float("nan"), float("inf"), True, "4"):
        with pytest.raises(ConfigError, match="named_late must be a finite number"):
            SteeringConfig(**gate, implicit_from_step=8, detector=folder, named_late=bad)
    with pytest.raises(ConfigError, match="named_late only acts with detector .* and implicit_from_step >= 1"):
        SteeringConfig(**gate, implicit_from_step=8, named_late=4.0)
    with pytest.raises(ConfigError, match="named_late only acts with detector"):
        SteeringConfig(**gate, named_late=4.0)
    with pytest.raises(ConfigError, match="detector needs implicit_from_step >= 1"):
        SteeringConfig(**gate, detector=folder, named_late=4.0)
    with pytest.raises(ConfigError, match="named_late only acts with rivals"):
        SteeringConfig(concept="a cat", named_late=4.0)


def test_rival_late_setting_round_trips_reaches_the_gate_and_is_checked(tmp_path, shapes):
    pipe, sae = shapes
    folder = bundle.probe_dir("style", 7)
    gate = dict(concept="striped style", concept_words="striped", rivals=["dotted", "solid"], implicit=0.2)
    s = SteeringConfig(**gate, implicit_from_step=8, detector=folder, rival_late=2)
    assert s.rival_late == 2.0 and isinstance(s.rival_late, float)
    assert SteeringConfig.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert ds.ConceptSteering(sae, **gate, implicit_from_step=8, detector=folder, rival_late=2).steering(pipe).rows.rival_late == 2.0
    assert ds.ConceptSteering(sae, **gate, implicit_from_step=8, detector=folder).steering(pipe).rows.rival_late == 0.0
    with pytest.raises(ConfigError, match="rival_late must be a factor >= 0"):
        SteeringConfig(**gate, implicit_from_step=8, detector=folder, rival_late=-1.0)
    with pytest.raises(ConfigError, match="rival_late must be a finite number"):
        SteeringConfig(**gate, implicit_from_step=8, detector=folder, rival_late=float("nan"))
    with pytest.raises(ConfigError, match="rival_late only acts with detector"):
        SteeringConfig(**gate, implicit_from_step=8, rival_late=2.0)
    with pytest.raises(ConfigError, match="rival_late only acts with rivals"):
        SteeringConfig(concept="a cat", rival_late=2.0)


def test_rewind_setting_round_trips_reaches_the_gate_and_is_checked(tmp_path, shapes):
    pipe, sae = shapes
    folder = bundle.probe_dir("style", 7)
    gate = dict(concept="striped style", concept_words="striped", rivals=["dotted", "solid"], implicit=0.2)
    s = SteeringConfig(**gate, implicit_from_step=8, detector=folder, rewind=3)
    assert s.rewind == 3 and SteeringConfig.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    rows = ds.ConceptSteering(sae, **gate, implicit_from_step=8, detector=folder, rewind=3).steering(pipe).rows
    assert rows.rewind and rows.rewind_from_step == 3
    assert not ds.ConceptSteering(sae, **gate, implicit_from_step=8, detector=folder).steering(pipe).rows.rewind
    for bad in (True, -1, 2.5, "0"):
        with pytest.raises(ConfigError, match="rewind must be the denoising step"):
            SteeringConfig(**gate, implicit_from_step=8, detector=folder, rewind=bad)
    with pytest.raises(ConfigError, match="rewind=8 must be below implicit_from_step=8"):
        SteeringConfig(**gate, implicit_from_step=8, detector=folder, rewind=8)
    with pytest.raises(ConfigError, match="rewind redoes the samples a detector flagged"):
        SteeringConfig(**gate, implicit_from_step=8, rewind=0)
    with pytest.raises(ConfigError, match="rewind only acts with rivals"):
        SteeringConfig(concept="a cat", rewind=0)


def test_front_door_named_late_equals_family_gate_with_it(shapes):
    """SteeringConfig.named_late through ConceptSteering is family_gate(named_late=...) with the same probe's detector
    (up to float tolerance); on prompts naming the concept whose samples the probe flags (bar 0: every sample) it
    changes the images against named_late=None, which is family_gate's default of 1."""
    from diffusion_sae.concepts.probe import ConceptProbe
    from diffusion_sae.interventions.steer import concept_steering, family_gate, steer_text_encoder

    pipe, sae = shapes
    folder = bundle.probe_dir("style", 7)
    rivals = ["solid", "dotted", "checkered", "outlined", "gradient", "noisy", "wavy"]
    gate = dict(concept="striped style", strength=-2.0, concept_words=["stripes", "striped"], rivals=rivals,
                implicit=1.0, implicit_from_step=8, match="tokens", detector=str(folder), detector_threshold=0.0)
    prompts = PROMPT                        # both name the concept ("striped")

    def gen():
        g = [torch.Generator().manual_seed(s) for s in range(len(prompts))]
        return pipe(prompts, num_inference_steps=STEPS, guidance_scale=2.0, generator=g, output_type="pt").images

    def via_config(**kw):
        iv = ds.ConceptSteering(sae, **gate, **kw)
        with ds.intervene(pipe, iv):
            return gen(), iv.steering(pipe).rows.named_late

    probe = ConceptProbe.from_pretrained(folder)
    st = concept_steering(sae, pipe, bundle.TEXT_HOOKPOINT, "striped style", -2.0)
    st.rows = family_gate(pipe, bundle.TEXT_HOOKPOINT, ["stripes", "striped"], rivals, 1.0, match="tokens",
                          implicit_from_step=8, detector=probe.detector("striped", 0.0), named_late=4.0)
    with steer_text_encoder(pipe, st):
        want = gen()
    got, late = via_config(named_late=4.0)
    assert late == 4.0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    plain, late = via_config()
    assert late == 1.0
    assert (got - plain).abs().amax(dim=(1, 2, 3)).min() > 1e-3     # every flagged named sample changes
    assert ds.applied(pipe) == [] and _registered(pipe) == []


def test_apply_then_remove_restores_the_plain_image_bit_for_bit(shapes):
    pipe, sae = shapes
    plain = _gen(pipe)
    steer = ds.ConceptSteering(sae, concept="striped style", strength=-2.0)
    assert ds.apply(pipe, steer) == ["steering:striped style"]
    assert ds.applied(pipe) == ["steering:striped style"]
    steered = _gen(pipe)
    assert (steered - plain).abs().mean() > 1e-2      # the steering is on
    with pytest.raises(InterventionError, match="already applied"):
        ds.apply(pipe, steer)
    assert ds.remove(pipe, "steering:striped style") == ["steering:striped style"]
    assert ds.applied(pipe) == [] and _registered(pipe) == [] and "encode_prompt" not in pipe.__dict__
    assert torch.equal(_gen(pipe), plain)
    with pytest.raises(InterventionError, match="no intervention named"):
        ds.remove(pipe, "steering:striped style")


def test_front_door_steering_equals_the_function_it_wraps(shapes):
    from diffusion_sae.interventions.steer import concept_steering, steer_text_encoder

    pipe, sae = shapes
    with steer_text_encoder(pipe, concept_steering(sae, pipe, bundle.TEXT_HOOKPOINT, "striped style", -2.0,
                                                   baseline="", gate="striped")):
        want = _gen(pipe)
    with ds.intervene(pipe, ds.ConceptSteering(sae, concept="striped style", strength=-2.0, baseline="",
                                               gate="striped")):
        got = _gen(pipe)
    assert torch.equal(got, want)


def test_saeuron_through_the_front_door_equals_unlearn_concepts(shapes):
    from diffusion_sae.interventions.ablate import unlearn_concepts

    pipe, _ = shapes
    block, dictionary = bundle.load_block_sae(), bundle.load_dictionary("object")
    plain = _gen(pipe, STEPS)
    with unlearn_concepts(pipe, block, dictionary, ["star"], multiplier=-10, top_n=2):
        want = _gen(pipe, STEPS)
    iv = ds.SAeUron(block, dictionary, concepts=["star"], multiplier=-10, top_n=2)
    assert iv.config == SAeUronConfig(concepts=("star",), multiplier=-10.0, top_n=2)
    with ds.intervene(pipe, iv):
        got = _gen(pipe, STEPS)
    assert torch.equal(got, want) and (got - plain).abs().mean() > 1e-3
    assert torch.equal(_gen(pipe, STEPS), plain)


def test_intervene_removes_its_hooks_when_the_pipeline_raises(shapes):
    pipe, sae = shapes
    plain = _gen(pipe)
    steer = ds.ConceptSteering(sae, concept="striped style", strength=-2.0, name="s")
    def fail(*args):
        raise RuntimeError("stop after the first step")

    with pytest.raises(RuntimeError, match="stop after the first step"):
        with ds.intervene(pipe, steer):
            assert ds.applied(pipe) == ["s"]
            pipe(PROMPT, num_inference_steps=2, callback_on_step_end=fail)
    assert ds.applied(pipe) == [] and _registered(pipe) == [] and "encode_prompt" not in pipe.__dict__
    assert torch.equal(_gen(pipe), plain)


def test_apply_is_all_or_nothing(shapes):
    pipe, sae = shapes
    good = ds.ConceptSteering(sae, concept="striped style", strength=-2.0, name="good")
    bad = ds.ConceptSteering(sae, concept="striped style", strength=-2.0, hookpoint="unet.up_blocks.1.attentions.1")
    with pytest.raises(ds.DiffusionSAEError, match="not in a text encoder"):
        ds.apply(pipe, good, bad)
    assert ds.applied(pipe) == [] and _registered(pipe) == []


def test_interventions_chain_with_other_registry_hooks_and_leave_them_in_place(shapes):
    # A foreign diffusers hook on the same text-encoder layer (as offloading / caching hooks would be):
    # steering stacks on it, and removing the steering by name leaves it in place and working.
    from diffusers.hooks import HookRegistry, ModelHook

    from diffusion_sae.models import registered, resolve_hookpoint

    class Shift(ModelHook):
        # a fixed direction (a uniform shift would vanish in the next LayerNorm)
        v = torch.randn(64, generator=torch.Generator().manual_seed(0))

        def post_forward(self, module, output):
            return (output[0] + self.v, *output[1:]) if isinstance(output, tuple) else output + self.v

    pipe, sae = shapes
    layer = resolve_hookpoint(pipe, bundle.TEXT_HOOKPOINT).module
    plain = _gen(pipe)
    registry = HookRegistry.check_if_exists_or_initialize(layer)
    registry.register_hook(Shift(), "foreign")
    try:
        shifted = _gen(pipe)
        assert (shifted - plain).abs().mean() > 1e-3
        with ds.intervene(pipe, ds.ConceptSteering(sae, concept="striped style", strength=-2.0)):
            assert list(registered(layer))[0] == "foreign" and len(registered(layer)) == 2
            both = _gen(pipe)
        assert list(registered(layer)) == ["foreign"]
        assert (both - shifted).abs().mean() > 1e-2
        assert torch.equal(_gen(pipe), shifted)
    finally:
        registry.remove_hook("foreign", recurse=False)
    assert torch.equal(_gen(pipe), plain)


def test_feature_scaling_in_a_step_window(shapes):
    # The intervention of interventions/scale.py, added in that one file: factor 1 is exact, a window edits
    # only its steps, and the UI's feature scaling (app/engine.py) is the same edit.
    from diffusion_sae.app.engine import scale_block_features
    from diffusion_sae.interventions.scale import FeatureScalingConfig

    pipe, _ = shapes
    block = bundle.load_block_sae()
    off = {j: 0.0 for j in range(block.cfg.num_latents)}
    plain = _gen(pipe, STEPS)
    with ds.intervene(pipe, ds.FeatureScaling(block, features={3: 1.0, 7: 1.0})):
        assert torch.equal(_gen(pipe, STEPS), plain)
    with ds.intervene(pipe, ds.FeatureScaling(block, features=off)):
        full = _gen(pipe, STEPS)
    with scale_block_features(pipe, block, bundle.BLOCK_HOOKPOINT, off):
        assert torch.equal(_gen(pipe, STEPS), full)
    with ds.intervene(pipe, ds.FeatureScaling(block, features=off, steps=(0, STEPS))):
        assert torch.equal(_gen(pipe, STEPS), full)
    with ds.intervene(pipe, ds.FeatureScaling(block, features=off, steps=(0, 5))):
        early = _gen(pipe, STEPS)
    assert (full - plain).abs().mean() > 1e-2
    assert 1e-4 < (early - plain).abs().mean() and not torch.equal(early, full)
    assert _registered(pipe) == [] and torch.equal(_gen(pipe, STEPS), plain)
    cfg = FeatureScalingConfig(features={12: 0.0, 3: 2.5}, steps=[2, 9])
    assert FeatureScalingConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="first < last"):
        FeatureScalingConfig(features={1: 0.0}, steps=(5, 5))
    with pytest.raises(ds.DiffusionSAEError, match="a step window needs a denoiser hookpoint"):
        ds.apply(pipe, ds.FeatureScaling(shapes[1], features={1: 0.0}, steps=(0, 5)))
    assert ds.applied(pipe) == []


def test_replace_edit_moves_concept_free_images_less_than_the_scale_flip(shapes):
    """SAeUron's detect-then-replace edit on the bundled model (striped at up_blocks.1.attentions.0, the shipped
    detection: 16 features, specific bars, 3 firing together): on prompts without striped the image moves far
    less than under the γ = −6 flip, on prompts with striped it still moves. Measured: mean |Δ| per image
    0.004 vs 0.022 without striped, 0.034 with it (the flip: 0.070)."""
    from diffusion_sae.eval.shapes import saeuron_context

    pipe, _ = shapes
    block = "unet.up_blocks.1.attentions.0"
    blocks = bundle.load_blocks("style", [block])
    sets = {"with": ["a red star in striped style", "a blue heart in striped style",
                     "a green ring in striped style", "a yellow square in striped style"] * 2,
            "without": ["a red star in dotted style", "a blue heart in solid style", "a green circle", "a yellow square"] * 2}

    def gen(ps):
        g = [torch.Generator().manual_seed(500 + i) for i in range(len(ps))]
        return pipe(ps, num_inference_steps=STEPS, guidance_scale=2.0, generator=g, output_type="pt").images

    plain = {k: gen(ps) for k, ps in sets.items()}
    p = {"blocks": [block], "top_n": 16, "multiplier": -6.0, "scaling": "latent", "selection": "specific", "min_fire": 3}
    change = {}
    for edit in ("scale", "replace"):
        with saeuron_context(pipe, blocks, {"striped": dict(p, edit=edit)}):
            for k, ps in sets.items():
                change[edit, k] = float((gen(ps) - plain[k]).abs().mean())
    assert change["replace", "without"] < 0.5 * change["scale", "without"], change
    assert change["replace", "with"] > 0.01 and change["replace", "with"] > 3 * change["replace", "without"], change
    assert _registered(pipe) == []


def test_saeuron_extra_edits_and_the_below_gate_on_the_bundled_model(shapes):
    """A preset's "extra_edits" equal the same presets' contexts stacked, bit for bit; the extra edit gated
    [0, 0.5, "cond", "below"] (the shipped gradient's prior edit) leaves a prompt that asks for gradient exactly
    as the main edit alone draws it and moves a prompt without the style; bad "extra_edits" are one error."""
    import contextlib

    from diffusion_sae.eval.shapes import saeuron_context

    pipe, _ = shapes
    blocks = bundle.load_blocks("style")
    main = {"blocks": ["unet.up_blocks.1.attentions.0"], "top_n": 32, "multiplier": -8.0, "scaling": "latent",
            "selection": "specific", "min_fire": 3, "window": [1, 25], "detector": [0, 0.5, "cond"]}
    prior = {"blocks": ["unet.up_blocks.0.attentions.0", "unet.up_blocks.0.attentions.1"], "top_n": 24,
             "multiplier": -2.0, "scaling": "latent", "selection": "specific", "min_fire": 1, "window": [1, 25],
             "detector": [0, 0.5, "cond", "below"]}
    prompts = ["a red star in gradient style", "a blue heart", "", "a green ring in gradient style"]

    def gen():
        g = [torch.Generator().manual_seed(700 + i) for i in range(len(prompts))]
        return pipe(prompts, num_inference_steps=STEPS, guidance_scale=2.0, generator=g, output_type="pt").images

    plain = gen()
    with saeuron_context(pipe, blocks, {"gradient": main}):
        main_only = gen()
    with saeuron_context(pipe, blocks, {"gradient": dict(main, extra_edits=[prior])}):
        both = gen()
    with contextlib.ExitStack() as stack:
        stack.enter_context(saeuron_context(pipe, blocks, {"gradient": main}))
        stack.enter_context(saeuron_context(pipe, blocks, {"gradient": prior}))
        stacked = gen()
    torch.testing.assert_close(both, stacked, rtol=0, atol=0)
    for i in (0, 3):        # the prompt asks for gradient: the below gate keeps the prior edit off
        torch.testing.assert_close(both[i], main_only[i], rtol=0, atol=0)
    for i in (1, 2):        # no gradient asked for: the main edit's gate is shut, the prior edit acts
        torch.testing.assert_close(main_only[i], plain[i], rtol=0, atol=0)
        assert float((both[i] - plain[i]).abs().mean()) > 1e-3
    for bad in ({"top_n": 4}, [{"extra_edits": []}], ["x"]):
        with pytest.raises(ValueError, match="extra_edits"):
            with saeuron_context(pipe, blocks, {"gradient": dict(main, extra_edits=bad)}):
                pass
    assert _registered(pipe) == []


def test_two_interventions_removed_by_name_in_any_order(shapes):
    pipe, sae = shapes
    block, dictionary = bundle.load_block_sae(), bundle.load_dictionary("object")
    steer = ds.ConceptSteering(sae, concept="striped style", strength=-2.0)
    unlearn = ds.SAeUron(block, dictionary, concepts=["star"], multiplier=-10, top_n=2)
    plain = _gen(pipe, STEPS)
    with ds.intervene(pipe, unlearn):
        unlearn_only = _gen(pipe, STEPS)
    ds.apply(pipe, unlearn, steer)
    try:
        assert ds.applied(pipe) == ["saeuron:star", "steering:striped style"]
        both = _gen(pipe, STEPS)
        ds.remove(pipe, "saeuron:star")          # the older one first
        steer_only = _gen(pipe, STEPS)
    finally:
        ds.remove(pipe)
    with ds.intervene(pipe, steer):
        assert torch.equal(_gen(pipe, STEPS), steer_only)   # what is left is exactly the steering alone
    assert not torch.equal(both, unlearn_only) and not torch.equal(both, steer_only)
    assert not torch.equal(steer_only, plain)
    ds.apply(pipe, unlearn)
    assert ds.remove(pipe) == ["saeuron:star"]
    assert _registered(pipe) == [] and torch.equal(_gen(pipe, STEPS), plain)


def test_two_steerings_removed_newest_first_leave_the_older_one_working(shapes):
    pipe, sae = shapes
    striped = ds.ConceptSteering(sae, concept="striped style", strength=-2.0)
    red = ds.ConceptSteering(sae, concept="red", strength=-2.0)
    with ds.intervene(pipe, striped):
        striped_only = _gen(pipe)
    ds.apply(pipe, striped, red)
    try:
        both = _gen(pipe)
        ds.remove(pipe, "steering:red")
        assert torch.equal(_gen(pipe), striped_only)
    finally:
        ds.remove(pipe)
    assert not torch.equal(both, striped_only)
    assert _registered(pipe) == [] and "encode_prompt" not in pipe.__dict__
