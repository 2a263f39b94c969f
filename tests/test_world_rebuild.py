"""`world rebuild` on a tiny configuration: every step runs, is recorded, resumes, never writes into the package."""
import json

import pytest

from diffusion_sae.world import assets
from diffusion_sae.world.rebuild import STEPS, Rebuild, RebuildConfig, RebuildError

HP = "unet.mid_block.attentions.0.transformer_blocks.0.attn2"
HP2 = "unet.down_blocks.2.attentions.0.transformer_blocks.0.attn2"


def tiny(**kw):
    base = dict(unet_steps=2, unet_warmup=1, unet_batch=4, init_from=str(assets.pipeline_dir()),
                keep_classifier=str(assets.classifier_dir()), prompts=6, text_prompts=6, text_epochs=1.0,
                text_k=4, block_k=4, block_epochs_full_res=0.05, block_epochs_low_res=0.05, hookpoints=(HP, HP2),
                batch_prompts=6, dictionary_prompts=1, kinds=("style",), eval_seeds=1, eval_per_alias=1,
                eval_left_out=2, steps=2, guidance=5.0, probe_steps=(1,), probe_prompts=2)
    base.update(kw)
    return RebuildConfig(**base)


def test_rebuild_tiny_every_step_recorded_and_resumable(tmp_path):
    out = tmp_path / "world"
    logs = []
    # first run stops after the pipeline, as a killed rebuild would
    Rebuild(out, tiny(only=("classifier", "unet")), log=logs.append).run()
    rec = json.loads((out / "rebuild.json").read_text())
    assert set(rec["steps"]) == {"classifier", "unet"}
    assert (out / "shapescanvas" / "model_index.json").exists()
    assert rec["steps"]["unet"]["result"]["steps"] == 2
    # the rerun skips what is done and finishes the rest
    rec = Rebuild(out, tiny(), log=logs.append).run()
    assert any("[unet] done earlier, skipped" in m for m in logs)
    assert list(rec["steps"]) == list(STEPS)
    for s in STEPS:
        assert rec["steps"][s]["done"] and rec["steps"][s]["seconds"] >= 0
    assert (out / "saes" / "text_encoder.text_model.encoder.layers.2" / "sae.safetensors").exists()
    block = out / "saes" / HP
    assert (block / "sae.safetensors").exists() and (block / "concept_dictionary_style.safetensors").exists()
    # each block gets its own SAE (a shared run folder once made every block a copy of the first one)
    from safetensors.torch import load_file
    w1, w2 = load_file(block / "sae.safetensors"), load_file(out / "saes" / HP2 / "sae.safetensors")
    assert any((w1[k] - w2[k]).abs().max() > 1e-4 for k in w1)
    assert json.loads((out / "saes" / HP2 / "cfg.json").read_text())["hookpoint"] == HP2
    ev = json.loads((out / "world-eval.json").read_text())
    assert 0.0 <= ev["named"]["object"] <= 1.0 and set(ev["held_out"]) >= {"object", "style", "colour"}
    assert set(ev["left_out"]) == {"style", "object", "colour", "all"}
    assert rec["steps"]["dictionaries"]["result"]["seeds"][0] == 500          # tuning seeds
    from diffusion_sae.world.bundle import load_probe
    probe = load_probe("style", 1, root=out / "saes")
    assert probe.step == 1 and probe.meta["seeds"][0] == 500 and len(probe.concepts) == 8
    cond = load_probe("style", 0, root=out / "saes", branch="cond")     # the prompt's-branch probes too
    assert cond.branch == "cond" and cond.step == 0 and cond.concepts == probe.concepts
    assert rec["config"]["unet_steps"] == 2


def test_rebuild_refuses_the_package_folder(tmp_path):
    with pytest.raises(RebuildError, match="never writes into the installed package"):
        Rebuild(assets.ASSETS / "rebuilt", tiny())
    with pytest.raises(RebuildError, match="--only 'bogus'"):
        Rebuild(tmp_path, tiny(only=("bogus",)))
