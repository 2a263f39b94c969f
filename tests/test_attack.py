"""UnlearnDiffAtk-style adversarial prompts (diffusion_sae.eval.attack) on the bundled ShapesCanvas world."""
import pytest
import torch

from diffusion_sae.eval.attack import (AttackConfig, PromptAttack, attack_report_section, render_targets,
                                       run_attack_benchmark, saeuron_builder, steerers_builder)
from diffusion_sae.world import assets, bundle

PROMPT = "a red star in striped style"


@pytest.fixture(scope="module")
def pipe():
    return assets.load_pipeline()


@pytest.fixture(scope="module")
def classifier():
    return assets.load_classifier()


@pytest.fixture(scope="module")
def targets():
    return render_targets("star", "striped", "red", 8, seed=0)


@pytest.fixture(scope="module")
def saeuron(pipe):
    # The paper's single block (the last text-conditioned one): a cut graph there gives exactly zero gradient.
    params = {"striped": {"top_n": 2, "multiplier": -5.0, "blocks": [bundle.BLOCK_HOOKPOINT]}}
    return saeuron_builder(pipe, bundle.load_blocks("style"), params)("striped")


def _small(**kw):
    base = dict(steps=12, batch=4, n_targets=8, n_images=2, eval_timesteps=3)
    base.update(kw)
    return AttackConfig(**base)


def test_targets_show_the_concept(classifier, targets):
    pred = classifier.predict(targets)
    assert targets.shape == (8, 3, 32, 32)
    assert (pred["style"] == 1).all() and (pred["object"] == 3).all() and (pred["colour"] == 0).all()


def test_loss_decreases_without_intervention(pipe, targets):
    cfg = _small(steps=16, probe_every=4)
    r = PromptAttack(pipe, PROMPT, targets, cfg).run(None)
    assert len(r.losses) == 16 and all(torch.isfinite(torch.tensor(r.losses)))
    # the same fixed (t, ε, images) probe before, during and after the optimisation
    steps, probes = zip(*r.probe_losses)
    assert steps == (0, 4, 8, 12, 16)
    assert r.loss_after < r.loss_before
    assert sum(probes[-2:]) / 2 < sum(probes[:2]) / 2
    assert r.embeddings.shape == (5, pipe.text_encoder.config.hidden_size)
    assert len(r.projected_ids) == 5 and r.projected_text.endswith(PROMPT)


def test_gradient_reaches_embeddings_through_saeuron(pipe, targets, saeuron):
    att = PromptAttack(pipe, PROMPT, targets, _small())
    emb, _ = att.init_embeddings()
    emb.requires_grad_(True)
    noise = torch.randn(4, *att.latents.shape[1:], generator=torch.Generator().manual_seed(0))
    grads, losses = {}, {}
    for mode in ("cut", "bpda", "exact"):
        with att.active(saeuron, gradient=mode):
            loss = att.loss(emb, 6, [0, 1, 2, 3], noise)
            (g,) = torch.autograd.grad(loss, [emb], allow_unused=True)
        grads[mode], losses[mode] = (torch.zeros_like(emb) if g is None else g), loss.item()
    with att.active(None):
        plain = att.loss(emb, 6, [0, 1, 2, 3], noise).item()
    # The edit fired (the loss changed) and cut the graph: nothing text-conditioned follows the block.
    assert abs(losses["cut"] - plain) > 1e-4
    assert float(grads["cut"].norm()) == 0.0
    # Straight-through (and the exact edit) carry the gradient to the adversarial embeddings.
    assert float(grads["bpda"].norm()) > 1e-3 and float(grads["exact"].norm()) > 1e-3
    assert losses["bpda"] == pytest.approx(losses["cut"]) == pytest.approx(losses["exact"])
    # The models' own parameters gather no gradient.
    assert all(p.grad is None for p in pipe.unet.parameters())
    # A short SAeUron attack runs and takes steps.
    r = PromptAttack(pipe, PROMPT, targets, _small(steps=3)).run(saeuron)
    assert r.bridged >= 1 and all(n > 0 for n in r.grad_norms)


def test_same_seed_same_embeddings(pipe, targets):
    a = PromptAttack(pipe, PROMPT, targets, _small(steps=4, seed=3)).run(None)
    b = PromptAttack(pipe, PROMPT, targets, _small(steps=4, seed=3)).run(None)
    c = PromptAttack(pipe, PROMPT, targets, _small(steps=4, seed=4)).run(None)
    assert torch.equal(a.embeddings, b.embeddings) and a.losses == b.losses
    assert not torch.equal(a.embeddings, c.embeddings)


def test_injection_with_the_placeholder_embedding_is_the_text_prompt(pipe, targets):
    att = PromptAttack(pipe, PROMPT, targets, _small())
    same = att.W[[att.marker] * 5].float()
    got = att.generate(same, None, seeds=[0, 1])
    want = pipe([att.adv_text] * 2, num_inference_steps=25, guidance_scale=att.cfg.guidance, output_type="pt",
                generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images.float()
    torch.testing.assert_close(got, want)
    assert not torch.allclose(att.generate(same * 3, None, seeds=[0, 1]), want)


@pytest.mark.parametrize("call, match", [
    (lambda p, c, t: run_attack_benchmark(p, c, {"none": None}, "texture", ["striped"]), "unknown concept kind 'texture'"),
    (lambda p, c, t: run_attack_benchmark(p, c, {"none": None}, "style", ["plaid"]), "unknown style 'plaid'"),
    (lambda p, c, t: run_attack_benchmark(p, c, {"none": None}, "object", ["striped"]), "unknown object 'striped'"),
    (lambda p, c, t: run_attack_benchmark(p, c, {"none": None}, "style", ["striped"], AttackConfig(n_tokens=0)),
     r"n_tokens must be an integer >= 1"),
    (lambda p, c, t: PromptAttack(p, PROMPT, t, AttackConfig(n_tokens=-2)), r"n_tokens must be an integer >= 1"),
    (lambda p, c, t: PromptAttack(p, PROMPT, t, AttackConfig(n_tokens=10)), r"needs 18 > the text encoder's 16"),
    (lambda p, c, t: PromptAttack(p, PROMPT, t, AttackConfig(gradient="magic")), "gradient must be one of"),
    (lambda p, c, t: PromptAttack(p, " ", t, AttackConfig()), "prompt is empty"),
    (lambda p, c, t: run_attack_benchmark(p, c, {}, "style", ["striped"]), "no intervention given"),
])
def test_bad_inputs_raise_clear_errors(pipe, classifier, targets, call, match):
    with pytest.raises(ValueError, match=match) as e:
        call(pipe, classifier, targets)
    assert "\n" not in str(e.value)


def test_benchmark_rows_and_report(pipe, classifier, tmp_path):
    from diffusion_sae.eval.report import write_report

    st = bundle.load_params()["steer"]
    interventions = {"none": lambda c: None,
                     "Concept Steerers": steerers_builder(pipe, bundle.load_text_sae(), "style", st)}
    res = run_attack_benchmark(pipe, classifier, interventions, "style", ["striped"], _small(steps=2))
    assert set(res["rows"]) == {"none", "Concept Steerers"}
    for rows in res["rows"].values():
        (r,) = rows
        for k in ("presence_plain", "presence_intervened", "presence_random_tokens", "asr", "asr_projected"):
            assert 0.0 <= r[k] <= 1.0
    # plain presence is measured once per concept and shared
    assert res["rows"]["none"][0]["presence_plain"] == res["rows"]["Concept Steerers"][0]["presence_plain"]
    assert res["rows"]["none"][0]["presence_intervened"] == res["rows"]["none"][0]["presence_plain"]
    sec = attack_report_section(res)
    assert len(sec.tables[0].rows) == 2
    paths = write_report(tmp_path, "attack", [sec], res["settings"], html_too=False)
    assert "ASR (continuous)" in paths["md"].read_text()
