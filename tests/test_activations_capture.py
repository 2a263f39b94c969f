"""Capture: tensors equal a direct forward of the module, branch labels right, any size / guidance."""
import math

import pytest
import torch
from _tiny import tiny

from diffusion_sae.activations import capture_activations
from diffusion_sae.models import HookpointError, resolve_hookpoint


DENOISER_HP = {"sd": "unet.up_blocks.1.attentions.1", "sdxl": "unet.up_blocks.0.attentions.1",
               "sd3": "transformer.transformer_blocks.1", "flux": "transformer.single_transformer_blocks.0"}
TEXT_HP = {"sd": "text_encoder.text_model.encoder.layers.9", "sdxl": "text_encoder_2.text_model.encoder.layers.28",
           "sd3": "text_encoder_3.encoder.block.2", "flux": "text_encoder_2.encoder.block.22"}


def _call(pipe, family, prompt, negative, steps=2, h=32, w=48, seed=0, **kw):
    kw = dict(num_inference_steps=steps, height=h, width=w, output_type="latent",
              generator=torch.Generator().manual_seed(seed), **kw)
    if family == "flux":  # no CFG batch: true CFG runs a separate unconditional call
        kw.update(max_sequence_length=16, true_cfg_scale=3.0, negative_prompt=negative)
    else:
        kw.update(guidance_scale=5.0, negative_prompt=negative)
    return pipe(prompt, **kw)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_captured_tensor_equals_direct_forward_of_the_module(family):
    pipe = tiny(family)
    names = [DENOISER_HP[family], DENOISER_HP[family] + ":input", DENOISER_HP[family] + ":update", TEXT_HP[family]]
    hps = [resolve_hookpoint(pipe, n) for n in names]
    saved = {}  # (module name) -> list of (args, kwargs) of every call, to replay afterwards

    def pre(name):
        def hook(m, args, kwargs):
            saved.setdefault(name, []).append((tuple(a.clone() if torch.is_tensor(a) else a for a in args),
                                               {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}))
        return hook

    handles = [hps[0].module.register_forward_pre_hook(pre("den"), with_kwargs=True),
               hps[3].module.register_forward_pre_hook(pre("text"), with_kwargs=True)]
    try:
        with capture_activations(pipe, hps, branches=("cond", "uncond")) as cap:
            _call(pipe, family, ["a photo of a cat", "a red circle"], ["ugly", "blurry dog"])
    finally:
        for h in handles:
            h.remove()
    from diffusion_sae.models import as_tokens, input_tensor, output_tensor
    den_calls = saved["den"]
    den_records = [r for r in cap.records if r.hookpoint == names[0]]
    per_call = 2 if family != "flux" else 1
    assert len(den_records) == len(den_calls) * per_call
    with torch.no_grad():
        for ci, (args, kwargs) in enumerate(den_calls):
            out, _ = as_tokens(output_tensor(hps[0].module(*args, **kwargs), hps[0].module))
            inp, _ = as_tokens(input_tensor(args, kwargs))
            for name, ref in ((names[0], out), (names[1], inp), (names[2], out - inp)):
                recs = [r for r in cap.records if r.hookpoint == name][ci * per_call:(ci + 1) * per_call]
                got = torch.cat([r.activations for r in recs]) if family != "flux" else recs[0].activations
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        text_records = [r for r in cap.records if r.hookpoint == names[3]]
        assert len(text_records) == len(saved["text"])
        for (args, kwargs), r in zip(saved["text"], text_records):
            ref = output_tensor(hps[3].module(*args, **kwargs), hps[3].module)
            torch.testing.assert_close(r.activations, ref, rtol=1e-5, atol=1e-5)
            assert r.step_index == -1 and math.isnan(r.timestep)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_branch_labels_swap_when_prompt_and_negative_swap(family):
    """Step 0 sees the same noise; swapping prompt and negative prompt must swap cond and uncond exactly."""
    pipe = tiny(family)
    hps = [DENOISER_HP[family], TEXT_HP[family]]
    P, N = ["a photo of a cat", "a red circle"], ["ugly dark", "blurry dog"]
    runs = []
    for prompt, neg in ((P, N), (N, P)):
        with capture_activations(pipe, hps, branches=("cond", "uncond"), steps=[0]) as cap:
            _call(pipe, family, prompt, neg, steps=2, seed=3)
        runs.append({(r.hookpoint, r.branch): r for r in cap.records})
    a, b = runs
    for hp in hps:
        assert set(k[1] for k in a if k[0] == hp) == {"cond", "uncond"}
        torch.testing.assert_close(a[(hp, "cond")].activations, b[(hp, "uncond")].activations, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a[(hp, "uncond")].activations, b[(hp, "cond")].activations, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(a[(hp, "cond")].activations, a[(hp, "uncond")].activations)
        assert a[(hp, "cond")].prompt_index.tolist() == [0, 1]
    # and the text capture's cond branch is the direct encoding of the prompt
    enc_name = TEXT_HP[family].split(".")[0]
    tok = getattr(pipe, enc_name.replace("text_encoder", "tokenizer"))
    layer = int(TEXT_HP[family].rsplit(".", 1)[1])
    length = a[(TEXT_HP[family], "cond")].activations.shape[1]
    ids = tok(P, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hs = getattr(pipe, enc_name)(ids, output_hidden_states=True).hidden_states
    # (hidden_states[i + 1] is block i's output; only the very last entry is after T5's final norm)
    torch.testing.assert_close(a[(TEXT_HP[family], "cond")].activations, hs[layer + 1], rtol=1e-5, atol=1e-5)
    # Absolute check for the denoiser: with guidance off only the prompt is denoised, and that is "cond".
    kw = dict(num_inference_steps=2, height=32, width=48, output_type="latent", generator=torch.Generator().manual_seed(3))
    kw.update(max_sequence_length=16) if family == "flux" else kw.update(guidance_scale=1.0)
    with capture_activations(pipe, [DENOISER_HP[family]], branches=("cond", "uncond"), steps=[0]) as cap:
        pipe(P, **kw)
    assert [r.branch for r in cap.records] == ["cond"]
    torch.testing.assert_close(cap.records[0].activations, a[(DENOISER_HP[family], "cond")].activations,
                               rtol=1e-5, atol=1e-5)


def test_guidance_off_batch_sizes_steps_filter_and_non_square():
    pipe = tiny("sd")
    with capture_activations(pipe, ["unet.up_blocks.1.attentions.1"], branches=("cond", "uncond"),
                             steps=[1, 2]) as cap:
        pipe(["a", "b", "c"], num_inference_steps=3, guidance_scale=1.0, num_images_per_prompt=2, height=48, width=32,
             output_type="latent")
    assert [(r.step_index, r.branch) for r in cap.records] == [(1, "cond"), (2, "cond")]
    r = cap.records[0]
    assert r.activations.shape == (6, 6 * 4, 64) and r.grid == (6, 4)
    assert r.prompt_index.tolist() == [0, 0, 1, 1, 2, 2] and r.image_index.tolist() == [0, 1] * 3
    assert r.timestep == pytest.approx(float(pipe.scheduler.timesteps[1]))


def test_capture_sink_callable_and_prompt_ids_and_dtype():
    pipe = tiny("sd")
    got = []
    with capture_activations(pipe, ["unet.mid_block.attentions.0"], branches=("cond",), to=got.append,
                             prompt_ids=[7, 9], dtype=torch.float16) as cap:
        pipe(["a", "b"], num_inference_steps=1, output_type="latent")
    assert cap.records == [] and len(got) == 1
    assert got[0].prompt_index.tolist() == [7, 9] and got[0].activations.dtype == torch.float16


def test_hookpoint_with_a_2d_tensor_is_a_clear_error_and_hooks_are_removed():
    pipe = tiny("sd")
    n_hooks = len(pipe.unet.time_embedding._forward_hooks)
    with pytest.raises(HookpointError, match=r"unet\.time_embedding.*2-D.*only 3-D"):
        with capture_activations(pipe, ["unet.time_embedding"]):
            pipe("a", num_inference_steps=1, output_type="latent")
    assert len(pipe.unet.time_embedding._forward_hooks) == n_hooks
