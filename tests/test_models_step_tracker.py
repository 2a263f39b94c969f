"""StepTracker: step index from the timestep argument, branches from the pipeline's batching, clean removal."""
import pytest
from _tiny import tiny

from diffusion_sae.models import StepTracker


def _log(tracker, log):
    def hook(module, args, kwargs, output):
        log.append((tracker.step_index, tracker.timestep, tracker.num_steps, tracker.branches(tracker.batch_size)))
    return hook


@pytest.mark.parametrize("family,steps", [("sd", 3), ("sd", 5), ("sdxl", 4), ("sd3", 3), ("flux", 3)])
def test_step_index_follows_scheduler_timesteps_across_calls(family, steps):
    pipe = tiny(family)
    log = []
    den = pipe.unet if family in ("sd", "sdxl") else pipe.transformer
    kw = dict(num_inference_steps=steps, output_type="latent", height=32, width=32)
    if family == "flux":
        kw["max_sequence_length"] = 16
    with StepTracker(pipe) as tr:
        # the tracker sets its state inside the denoiser's forward (a diffusers ModelHook): read it after the call
        h = den.register_forward_hook(_log(tr, log), with_kwargs=True)
        try:
            pipe("a cat", **kw)
            pipe("a dog", **kw)  # a second call restarts at step 0: no call counting
        finally:
            h.remove()
    ts = pipe.scheduler.timesteps.tolist()
    assert [s for s, *_ in log] == list(range(steps)) * 2
    assert [t for _, t, *_ in log] == pytest.approx(ts * 2, rel=1e-5)
    assert all(n == steps for *_, n, _ in log)


def test_branches_sd_cfg_on_off_and_images_per_prompt():
    pipe = tiny("sd")
    seen = []
    with StepTracker(pipe) as tr:
        h = pipe.unet.register_forward_hook(
            lambda m, a, k, out: seen.append((tr.branches(tr.batch_size), tr.images_per_prompt(tr.batch_size // 2))),
            with_kwargs=True)
        try:
            pipe(["a", "b", "c"], num_inference_steps=1, guidance_scale=5.0, num_images_per_prompt=2, output_type="latent")
            pipe(["a"], num_inference_steps=1, guidance_scale=1.0, output_type="latent")  # guidance off
            pipe(["a", "b"], num_inference_steps=1, guidance_scale=1.0, output_type="latent")  # batch 2, no CFG
        finally:
            h.remove()
    assert seen[0] == ({"uncond": slice(0, 6), "cond": slice(6, 12)}, 2)
    assert seen[1][0] == {"cond": slice(0, 1)}
    assert seen[2][0] == {"cond": slice(0, 2)}  # a batch of 2 without CFG is not mistaken for a doubled batch


def test_flux_true_cfg_branches_come_from_cache_context():
    pipe = tiny("flux")
    seen = []
    with StepTracker(pipe) as tr:
        h = pipe.transformer.register_forward_hook(
            lambda m, a, k, out: seen.append((tr.step_index, tr.branches(tr.batch_size))), with_kwargs=True)
        try:
            pipe("a cat", negative_prompt="a dog", true_cfg_scale=3.0, num_inference_steps=2, max_sequence_length=16,
                 output_type="latent", height=32, width=32)
            pipe("a cat", num_inference_steps=1, max_sequence_length=16, output_type="latent", height=32, width=32)
        finally:
            h.remove()
    assert seen == [(0, {"cond": slice(0, 1)}), (0, {"uncond": slice(0, 1)}),
                    (1, {"cond": slice(0, 1)}), (1, {"uncond": slice(0, 1)}), (0, {"cond": slice(0, 1)})]


def test_hooks_and_patches_removed_even_when_the_pipeline_raises():
    pipe = tiny("sd")
    from diffusion_sae.models import registered

    before = (dict(pipe.unet._forward_pre_hooks), dict(pipe.text_encoder._forward_pre_hooks))

    def boom(p, i, t, kw):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        with StepTracker(pipe):
            assert "encode_prompt" in pipe.__dict__
            assert list(registered(pipe.unet)) and list(registered(pipe.text_encoder))
            pipe("a", num_inference_steps=2, callback_on_step_end=boom, output_type="latent")
    assert (dict(pipe.unet._forward_pre_hooks), dict(pipe.text_encoder._forward_pre_hooks)) == before
    assert registered(pipe.unet) == {} and registered(pipe.text_encoder) == {}
    assert "encode_prompt" not in pipe.__dict__ and "check_inputs" not in pipe.__dict__
    pipe("a", num_inference_steps=1, output_type="latent")  # still a working pipeline


def test_shared_tracker_is_one_hook_whoever_leaves_first():
    from contextlib import ExitStack

    from diffusion_sae.models import registered

    pipe = tiny("sd")
    first, second = ExitStack(), ExitStack()
    a = first.enter_context(StepTracker.shared(pipe))
    b = second.enter_context(StepTracker.shared(pipe))
    assert a is b and len(registered(pipe.unet)) == 1
    first.close()                                   # the first user leaves first: the tracker stays
    assert len(registered(pipe.unet)) == 1
    steps = []
    h = pipe.unet.register_forward_hook(lambda m, args, kw, out: steps.append(b.step_index), with_kwargs=True)
    try:
        pipe("a", num_inference_steps=3, output_type="latent")
    finally:
        h.remove()
    assert steps == [0, 1, 2]
    second.close()
    assert registered(pipe.unet) == {} and "encode_prompt" not in pipe.__dict__
    with StepTracker.shared(pipe) as c:             # a later user gets a fresh tracker
        assert c is not a and len(registered(pipe.unet)) == 1
