"""Interventions by name (interventions/registry.py): FeatureScaling, registered in its own file
(interventions/scale.py), works from the CLI (`intervene`), the UI's engine, `eval shapes` and `eval attack`
without any of them naming it; each entry point is checked by a measured effect."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from diffusion_sae.interventions import registry
from diffusion_sae.interventions.registry import RegistryError, get_intervention, make_config

from _cli import run_main

PROMPT = "a red star in striped style"
N_LATENTS = 1024   # the bundled block SAE
# Every feature of the bundled block SAE switched off: x + W_dec(0 − z) removes the SAE's reconstruction
# from the block's output, a change the judge and the pixels both see.
ALL_OFF = "features=" + ",".join(f"{j}:0" for j in range(N_LATENTS))
ALL_ONE = "features=" + ",".join(f"{j}:1" for j in range(N_LATENTS))


def test_registry_lists_the_methods_and_parses_settings():
    assert {"scale", "steer", "saeuron"} <= set(registry.intervention_names())
    spec = get_intervention("scale")
    cfg = make_config(spec, ["features=12:0,873:3", "steps=0,10"])
    assert cfg.features == {12: 0.0, 873: 3.0} and cfg.steps == (0, 10) and cfg.hookpoint is None
    assert make_config(spec, ['features={"5": 2}']).features == {5: 2.0}          # JSON works too
    assert make_config(get_intervention("steer"), ["concept=striped style", "strength=-2"]).concept == ("striped style",)
    with pytest.raises(RegistryError, match="no setting 'feature'"):
        make_config(spec, ["feature=1:0"])
    with pytest.raises(RegistryError, match="needs the setting 'features'"):
        make_config(spec, [])
    with pytest.raises(RegistryError, match="registered: .*scale"):
        get_intervention("nope")


def test_a_new_registration_is_found_by_name():
    from diffusion_sae.configs import Config

    @dataclass(frozen=True)
    class HalfConfig(Config):
        kind = "half"
        factor: float = 0.5

    made = []
    registry.register_intervention("test-half", HalfConfig, lambda sae, cfg, ctx: made.append(cfg.factor) or cfg)
    try:
        assert "test-half" in registry.intervention_names()
        assert registry.build_intervention("test-half", None, ["factor=0.25"]).factor == 0.25 and made == [0.25]
    finally:
        registry._REGISTRY.pop("test-half")


def _pixel_lines(out: str) -> list[float]:
    return [float(line.split("mean |edited - original| ")[1].split(" /")[0]) for line in out.splitlines()
            if "mean |edited - original|" in line]


def test_cli_intervene_runs_feature_scaling(tmp_path, capsys):
    code, out, err = run_main(["intervene", "--method", "scale", "--set", ALL_OFF, "--prompt", PROMPT,
                               "--steps", 4, "--out", tmp_path / "g.png"], capsys)
    assert code == 0, err
    assert (tmp_path / "g.png").is_file()
    assert _pixel_lines(out)[0] > 5.0, out                     # the edit shows in the pixels
    code, out, err = run_main(["intervene", "--method", "scale", "--set", ALL_ONE, "--prompt", PROMPT,
                               "--steps", 4, "--out", tmp_path / "same.png"], capsys)
    assert code == 0 and _pixel_lines(out) == [0.0], out        # factor 1 everywhere: the plain image


@pytest.mark.parametrize("args, msg", [
    (["--method", "nope"], "no intervention named 'nope'"),
    (["--method", "scale", "--set", "feature=1:0"], "no setting 'feature'"),
    (["--method", "scale", "--set", "features=99999:0"], "out of range"),
    (["--set", "features=1:0"], "give --method"),
])
def test_cli_intervene_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, args, msg):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(["intervene", *args, "--prompt", PROMPT, "--steps", 2, "--out", "g.png"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:") and msg in err, err
    assert list(tmp_path.iterdir()) == []


def test_ui_engine_applies_a_registered_intervention():
    from diffusion_sae.app.engine import ERRORS
    from diffusion_sae.app.shapescanvas import bundled_engine

    engine = bundled_engine(stats_prompts=[PROMPT], stats_seeds=[0], stats_steps=2)
    o, r = engine.generate(PROMPT, 0, 4, [], [("scale", ALL_OFF + ";\nsteps=0,4")])   # the UI box: ";" or new lines
    assert float(np.abs(o.astype(np.int16) - r.astype(np.int16)).mean()) > 5.0
    o2, same = engine.generate(PROMPT, 0, 4, [], [("scale", ALL_ONE)])
    assert np.array_equal(o2, same) and np.array_equal(o, o2)
    with pytest.raises(ERRORS, match="no setting 'feature'") as e:
        engine.generate(PROMPT, 0, 4, [], [("scale", "feature=1:0")])
    assert "\n" not in str(e.value)
    pytest.importorskip("gradio")
    from diffusion_sae.app.ui import build_app

    demo = build_app(engine)
    dropdowns = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "registered-method"]
    assert len(dropdowns) == 1 and "scale" in [c[0] if isinstance(c, tuple) else c for c in dropdowns[0].choices]


def test_eval_shapes_measures_a_registered_method(tmp_path, capsys):
    out = tmp_path / "shapes"
    code, text, err = run_main(["eval", "shapes", "--quick", "--no-builtin", "--method", "scale", "--set", ALL_OFF,
                                "--steps", 3, "--out", out], capsys)
    assert code == 0, err
    rows = json.loads((out / "results.json").read_text())["extra_methods"]["rows"]
    assert set(rows) == {"plain", "scale"}
    assert rows["scale"]["changed_predictions"] > 0.3 and rows["scale"]["fd_to_plain"] > 1.0, rows
    assert rows["scale"]["object"] < rows["plain"]["object"]
    assert "Registered interventions" in (out / "report.md").read_text() and "scale: agreement" in text


def test_eval_attack_attacks_a_registered_method(tmp_path, capsys):
    out = tmp_path / "attack"
    code, text, err = run_main(["eval", "attack", "--no-builtin", "--method", "scale", "--set", ALL_OFF,
                                "--concept", "striped", "--steps", 2, "--images", 4, "--out", out], capsys)
    assert code == 0, err
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert set(rows) == {"none", "scale"}
    none, scaled = rows["none"][0], rows["scale"][0]
    # the attack ran against the edited model: its loss and the judged presence differ from the plain model's
    assert scaled["presence_intervened"] < none["presence_intervened"]
    assert abs(scaled["loss_before"] - none["loss_before"]) > 1e-3
    assert scaled["bridged"] >= 1          # the gradient crossed the scaling edit (eval/attack.py)


def test_benchmarks_refuse_nothing_to_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for cmd in (["eval", "shapes"], ["eval", "attack"]):
        code, _, err = run_main([*cmd, "--no-builtin"], capsys)
        assert code == 2 and "give --method NAME" in err and len(err.splitlines()) == 1, err
    code, _, err = run_main(["eval", "shapes", "--method", "scale", "--set", "steps=3,1"], capsys)
    assert code == 2 and "--method scale" in err and "steps" in err, err
    assert list(tmp_path.iterdir()) == []
