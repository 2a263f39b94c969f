"""Every CLI command: --help, and a small-scale run of each (tiny pipelines or the bundled model)."""
import csv
import json

import pytest
from typer.testing import CliRunner

from diffusion_sae.cli import UserError, app

runner = CliRunner()


def _commands(typer_app, prefix=()):
    import typer.main

    click_app = typer.main.get_command(typer_app)
    stack = [(prefix, click_app)]
    while stack:
        path, cmd = stack.pop()
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                stack.append((path + (name,), sub))
        elif path:
            yield list(path)


def run(*args):
    r = runner.invoke(app, [str(a) for a in args], catch_exceptions=True)
    return r


def ok(*args):
    r = run(*args)
    assert r.exit_code == 0, (args, r.output, r.exception)
    return r.output


@pytest.mark.parametrize("cmd", list(_commands(app)), ids=lambda c: " ".join(c))
def test_every_command_has_help(cmd):
    out = ok(*cmd, "--help")
    assert "Usage" in out


def test_recipes_concepts_and_unlearn_on_a_tiny_pipeline(tmp_path):
    prompts = tmp_path / "p.csv"
    ok("world", "prompts", "--out", prompts, "--n", 12)
    rows = list(csv.DictReader(open(prompts)))
    assert len(rows) == 12 and all(r["prompt"] and r["evaluation_seed"] for r in rows)
    ok("train-text-sae", "--model", "tiny:sd", "--layer", 3, "--prompts", prompts, "--out", tmp_path / "text",
       "--k", 4, "--expansion", 2, "--batch-size", 128, "--epochs", 2)
    cfg = json.loads((tmp_path / "text" / "text_encoder.text_model.encoder.layers.3" / "cfg.json").read_text())
    assert cfg["k"] == 4 and cfg["num_latents"] == 2 * cfg["d_in"]
    ok("train-block-sae", "--model", "tiny:sd", "--prompts", prompts, "--out", tmp_path / "block", "--steps", 2,
       "--expansion", 2, "--k", 4, "--batch-size", 256, "--batch-prompts", 6)
    sae_dir = tmp_path / "block" / "unet.up_blocks.1.attentions.1"
    assert json.loads((sae_dir / "cfg.json").read_text())["batch_topk"] is True
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps({"cat": ["a cat", "a small cat"], "dog": ["a dog", "a big dog"]}))
    ok("concepts", "build", "--model", "tiny:sd", "--sae", sae_dir, "--concepts", concepts, "--steps", 2)
    assert (sae_dir / "concept_dictionary.safetensors").exists()
    ok("unlearn", "--model", "tiny:sd", "--sae", sae_dir, "--concept", "cat", "--prompt", "a cat", "--steps", 2,
       "--multiplier", -5, "--top-n", 2, "--out", tmp_path / "u.png")
    assert (tmp_path / "u.png").stat().st_size > 1000
    r = run("unlearn", "--model", "tiny:sd", "--sae", sae_dir, "--concept", "cat", "--prompt", "a cat", "--steps", 3,
            "--out", tmp_path / "u2.png")
    assert isinstance(r.exception, UserError) and "2 steps" in str(r.exception)


def test_steer_and_unlearn_on_the_bundled_model(tmp_path):
    ok("steer", "--concept", "striped style", "--strengths", "-1,0", "--prompt", "a red star in striped style",
       "--steps", 5, "--out", tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000
    r = run("steer", "--concept", "striped", "--strength", "lots", "--prompt", "a red star", "--out", tmp_path / "x.png")
    assert isinstance(r.exception, UserError) and "number" in str(r.exception)
    r = run("steer", "--concept", " ", "--strength", "-1", "--prompt", "a red star", "--out", tmp_path / "x.png")
    assert isinstance(r.exception, UserError) and "empty" in str(r.exception)
    ok("unlearn", "--concept", "striped", "--prompt", "a red star in striped style", "--out", tmp_path / "u.png")
    assert (tmp_path / "u.png").stat().st_size > 1000
    # two bundled blocks at once, latent scaling; token-aligned steering
    from diffusion_sae.world import assets, bundle
    folders = [str(assets.sae_dir() / h) for h in bundle.BLOCK_HOOKPOINTS]
    ok("unlearn", "--sae", folders[0], "--sae", folders[1], "--dictionary-name", "concept_dictionary_style",
       "--concept", "striped", "--multiplier", -2, "--scaling", "latent", "--top-n", 2, "--selection", "specific",
       "--prompt", "a red star in striped style", "--out", tmp_path / "u3.png")
    assert (tmp_path / "u3.png").stat().st_size > 1000
    ok("steer", "--concept", "striped style", "--strength", "-1", "--gate", "striped", "--prompt", "a red star in striped style",
       "--steps", 5, "--out", tmp_path / "s2.png")
    # the family gate with its implicit fraction from step 2 of 5 (a prompt naming no style)
    ok("steer", "--concept", "striped style", "--strength", "-1", "--concept-word", "striped", "--rival", "solid",
       "--implicit", "0.2", "--implicit-from-step", "2", "--prompt", "a red star", "--steps", 5, "--out", tmp_path / "s5.png")
    assert (tmp_path / "s5.png").stat().st_size > 1000
    ok("steer", "--concept", "red", "--strength", "-1", "--keep", "star", "--keep", "striped style", "--baseline", "",
       "--prompt", "a red star in striped style", "--steps", 5, "--out", tmp_path / "s3.png")
    assert (tmp_path / "s3.png").stat().st_size > 1000
    r = run("steer", "--concept", "red", "--strength", "-1", "--keep", " ", "--prompt", "a red star", "--out", tmp_path / "x.png")
    assert isinstance(r.exception, UserError) and "keep concept is empty" in str(r.exception)
    # contrastive pairs from files: example prompts with the concept against the same prompts without it
    (tmp_path / "with.txt").write_text("a red ring in striped style\n\na blue ring in dotted style\n")
    (tmp_path / "without.txt").write_text("a red circle in striped style\na blue circle in dotted style\n")
    out = ok("steer", "--concept-file", tmp_path / "with.txt", "--baseline-file", tmp_path / "without.txt", "--strength", "-1",
             "--gate", "ring", "--prompt", "a red ring in striped style", "--steps", 5, "--out", tmp_path / "s4.png")
    assert "with.txt" in out and (tmp_path / "s4.png").stat().st_size > 1000
    r = run("steer", "--concept-file", tmp_path / "nope.txt", "--strength", "-1", "--prompt", "a red ring", "--out", tmp_path / "x.png")
    assert isinstance(r.exception, UserError) and "--concept-file" in str(r.exception)
    r = run("steer", "--strength", "-1", "--prompt", "a red ring", "--out", tmp_path / "x.png")
    assert isinstance(r.exception, UserError) and "no concept" in str(r.exception)
    ok("unlearn", "--sae", folders[0], "--dictionary-name", "concept_dictionary_style", "--concept", "striped",
       "--multiplier", -2, "--scaling", "latent", "--top-n", 8, "--selection", "specific", "--min-fire", 2,
       "--prompt", "a red star in striped style", "--out", tmp_path / "u4.png")
    # a cross-attention layer's SAE, two concepts at once, one per patch
    block = str(assets.sae_dir() / "unet.up_blocks.1.attentions.0")
    ok("unlearn", "--sae", block, "--dictionary-name", "concept_dictionary_style", "--concept", "striped",
       "--concept", "dotted", "--multiplier", -2, "--scaling", "latent", "--top-n", 32, "--selection", "specific",
       "--exclusive", "--prompt", "a red star in dotted style", "--out", tmp_path / "u5.png")
    assert (tmp_path / "u5.png").stat().st_size > 1000
    r = run("unlearn", "--concept", "striped", "--min-fire", 0, "--prompt", "a red star", "--out", tmp_path / "x.png")
    assert isinstance(r.exception, UserError) and "min_fire" in str(r.exception)
    r = run("unlearn", "--concept", "striped", "--scaling", "big", "--prompt", "a red star", "--out", tmp_path / "x.png")
    assert isinstance(r.exception, UserError) and "scaling" in str(r.exception)
    # detect-then-replace: the firing features set to the other concepts' mean (γ ignored)
    ok("unlearn", "--sae", block, "--dictionary-name", "concept_dictionary_style", "--concept", "striped",
       "--top-n", 16, "--selection", "specific", "--min-fire", 3, "--edit", "replace",
       "--prompt", "a red star in striped style", "--out", tmp_path / "u6.png")
    assert (tmp_path / "u6.png").stat().st_size > 1000
    # the firing patch replaced whole by the other concepts' mean patch
    ok("unlearn", "--sae", block, "--dictionary-name", "concept_dictionary_style", "--concept", "striped",
       "--top-n", 16, "--selection", "specific", "--min-fire", 3, "--edit", "mean_patch",
       "--prompt", "a red star in striped style", "--out", tmp_path / "u7.png")
    assert (tmp_path / "u7.png").stat().st_size > 1000
    r = run("unlearn", "--concept", "striped", "--edit", "swap", "--prompt", "a red star", "--out", tmp_path / "x.png")
    assert isinstance(r.exception, UserError) and "--edit" in str(r.exception)


def test_concepts_probe_then_steer_with_it_as_detector_on_the_bundled_model(tmp_path):
    from diffusion_sae.concepts.probe import ConceptProbe

    groups = {"striped": ["a red star in striped style", "a blue ring in striped style"],
              "dotted": ["a red star in dotted style", "a blue ring in dotted style"],
              "solid": ["a red star in solid style", "a blue ring in solid style"]}
    (tmp_path / "styles.json").write_text(json.dumps(groups))
    out = ok("concepts", "probe", "--prompts", tmp_path / "styles.json", "--step", 2, "--steps", 5, "--seed-start", 700,
             "--out", tmp_path / "probe")
    assert "3 concepts" in out and "step 2 of 5" in out and "training accuracy" in out
    probe = ConceptProbe.from_pretrained(tmp_path / "probe")
    assert (probe.step, probe.concepts, probe.hookpoint) == (2, list(groups), "unet.up_blocks.1.attentions.1")
    assert probe.meta["seeds"] == list(range(700, 706)) and probe.meta["steps"] == 5 and probe.meta["guidance"] == 2.0
    # the bundled prompts of a kind, at that kind's probe block
    ok("concepts", "probe", "--kind", "colour", "--per-concept", 2, "--step", 1, "--steps", 3, "--out", tmp_path / "colour")
    colour = ConceptProbe.from_pretrained(tmp_path / "colour")
    assert len(colour.concepts) == 6 and colour.hookpoint == "unet.up_blocks.1.attentions.0"
    # steer: the probe flags samples from step 2, the implicit fraction acts on them from step 3 of 5
    ok("steer", "--concept", "striped style", "--strength", "-1", "--concept-word", "striped", "--rival", "dotted",
       "--rival", "solid", "--implicit", "0.5", "--implicit-from-step", 3, "--detector", tmp_path / "probe",
       "--detector-threshold", "0.4", "--prompt", "a red star", "--prompt", "a blue ring", "--steps", 5,
       "--out", tmp_path / "gated.png")
    assert (tmp_path / "gated.png").stat().st_size > 1000
    r = run("steer", "--concept", "striped style", "--strength", "-1", "--concept-word", "striped", "--rival", "dotted",
            "--implicit-from-step", 2, "--detector", tmp_path / "probe", "--prompt", "a red star", "--steps", 5,
            "--out", tmp_path / "x.png")
    assert isinstance(r.exception, UserError) and "reads step 2" in str(r.exception)
    assert not (tmp_path / "x.png").exists()


def test_concepts_probe_branch_cond_is_written_with_its_branch(tmp_path):
    """--branch cond fits the probe on the prompt's guidance branch (readable at step 0) and saves that branch in its
    JSON; the default stays the image side."""
    from diffusion_sae.concepts.probe import ConceptProbe

    groups = {"striped": ["a red star in striped style", "a blue ring in striped style"],
              "dotted": ["a red star in dotted style", "a blue ring in dotted style"]}
    (tmp_path / "styles.json").write_text(json.dumps(groups))
    out = ok("concepts", "probe", "--prompts", tmp_path / "styles.json", "--step", 0, "--steps", 2, "--branch", "cond",
             "--out", tmp_path / "cond")
    assert "(cond branch)" in out and "step 0 of 2" in out
    doc = json.loads((tmp_path / "cond" / "concept_probe.json").read_text())
    assert doc["meta"]["branch"] == "cond" and doc["step"] == 0 and doc["concepts"] == list(groups)
    assert ConceptProbe.from_pretrained(tmp_path / "cond").detector("striped").branch == "cond"
    out = ok("concepts", "probe", "--prompts", tmp_path / "styles.json", "--step", 0, "--steps", 2,
             "--out", tmp_path / "uncond")
    assert "(uncond branch)" in out
    assert json.loads((tmp_path / "uncond" / "concept_probe.json").read_text())["meta"]["branch"] == "uncond"


def _striped_removal(prompt: str) -> list:
    """`steer` removing striped behind a family gate (rivals dotted and solid, implicit scale 1), 10 steps."""
    return ["steer", "--concept", "striped style", "--strength", "-2", "--concept-word", "striped", "--rival", "dotted",
            "--rival", "solid", "--implicit", "1", "--prompt", prompt, "--steps", 10]


def _flag_every_sample() -> list:
    """The shipped step-7 style probe as detector at bar 0 (it flags every sample), the scale acting from step 8."""
    from diffusion_sae.world import bundle

    return ["--implicit-from-step", 8, "--detector", bundle.probe_dir("style", 7), "--detector-threshold", "0"]


def _saved_image(tmp_path, args: list, name: str, *extra):
    """Run `steer` with --save-images into tmp_path/name; the first image as int16 pixels."""
    import numpy as np
    from PIL import Image

    ok(*args, *extra, "--save-images", tmp_path / name)
    return np.asarray(Image.open(tmp_path / name / "0.png"), dtype=np.int16)


def test_steer_named_late_escalates_the_flagged_named_samples_on_the_bundled_model(tmp_path):
    """--named-late reaches the family gate: 1 is the run without it, image for image; 4 changes a prompt naming the
    concept whose sample the shipped style probe flags (bar 0: every sample)."""
    import numpy as np

    args = _striped_removal("a red star in striped style") + _flag_every_sample()
    base, one, four = (_saved_image(tmp_path, args, "base"), _saved_image(tmp_path, args, "one", "--named-late", "1"),
                       _saved_image(tmp_path, args, "four", "--named-late", "4"))
    assert np.array_equal(one, base)
    assert np.abs(four - base).max() > 8


def test_steer_rival_late_steers_a_flagged_prompt_naming_a_rival_on_the_bundled_model(tmp_path):
    """--rival-late reaches the family gate: a prompt naming a rival (dotted) is left plain by the gate without it, and
    with it at 0 (bit for bit); at 2 its sample, which the shipped style probe flags (bar 0), is steered; without
    --detector it is refused (one line, exit 2) before anything is written."""
    import numpy as np

    args, gate = _striped_removal("a red star in dotted style"), _flag_every_sample()
    base = _saved_image(tmp_path, args + gate, "base")
    zero = _saved_image(tmp_path, args + gate, "zero", "--rival-late", "0")
    two = _saved_image(tmp_path, args + gate, "two", "--rival-late", "2")
    assert np.array_equal(zero, base)
    assert np.abs(two - base).max() > 8
    r = run(*args, "--rival-late", "2", "--out", tmp_path / "x.png")
    assert isinstance(r.exception, UserError) and "--rival-late" in str(r.exception) and not (tmp_path / "x.png").exists()
    r = run(*args, *gate, "--rival-late", "-1", "--out", tmp_path / "x.png")
    assert isinstance(r.exception, UserError) and "--rival-late must be a factor >= 0" in str(r.exception)


def test_steer_rewind_redoes_the_flagged_sample_with_the_implicit_scale_from_the_first_step(tmp_path):
    """--rewind: a prompt naming no style, the shipped step-7 probe at bar 0 (flags every sample): the sample is
    redone with the implicit scale from step 0, which is the run without --implicit-from-step and --detector, pixel
    for pixel up to rounding, and differs from the gated run; --rewind without --detector is refused (one line, exit
    2 from the console script) before anything is written."""
    import numpy as np

    args, gate = _striped_removal("a red star"), _flag_every_sample()
    whole, gated = _saved_image(tmp_path, args, "whole"), _saved_image(tmp_path, args + gate, "gated")
    rewound = _saved_image(tmp_path, args + gate, "rewound", "--rewind")
    assert np.abs(rewound - whole).max() <= 1
    assert np.abs(gated - whole).max() > 8
    r = run(*args, "--rewind", "--out", tmp_path / "x.png")
    assert isinstance(r.exception, UserError) and "--rewind" in str(r.exception) and not (tmp_path / "x.png").exists()


def test_steer_repeated_detector_takes_one_threshold_per_probe_on_the_bundled_model(tmp_path):
    """--detector twice (the shipped image-side style probe at step 7, the prompt's-branch one at step 0) with one
    --detector-threshold per probe, by order: bar 1 on the first and 0 on the second is the second alone at 0 (any of
    them flags); a single --detector-threshold 1 applies to both and flags neither, so the sample stays unsteered."""
    import numpy as np
    from PIL import Image

    from diffusion_sae.world import bundle

    image, prompt = bundle.probe_dir("style", 7), bundle.probe_dir("style", 0, branch="cond")
    args = ["steer", "--concept", "striped style", "--strength", "-2", "--concept-word", "striped", "--rival", "dotted",
            "--rival", "solid", "--implicit", "1", "--implicit-from-step", 8, "--prompt", "a red star", "--steps", 10]

    def image_of(name, *extra):
        ok(*args, *extra, "--save-images", tmp_path / name)
        return np.asarray(Image.open(tmp_path / name / "0.png"), dtype=np.int16)

    both = image_of("both", "--detector", image, "--detector", prompt, "--detector-threshold", "1",
                    "--detector-threshold", "0")
    second = image_of("second", "--detector", prompt, "--detector-threshold", "0")
    neither = image_of("neither", "--detector", image, "--detector", prompt, "--detector-threshold", "1")
    assert np.array_equal(both, second)
    assert np.abs(neither - second).max() > 8


def test_unlearn_detector_gates_the_edits_per_sample_on_the_bundled_model(tmp_path):
    """unlearn --detector: with bar 1 the shipped image-side style probe (step 7) flags nothing and the unlearned
    image is the original; with the prompt's-branch probe (step 0) added at bar 0 (one bar per probe, by order) every
    sample is flagged at step 0, so the edits act from step 1 on: the run without a detector with --window 1-25."""
    import numpy as np
    from PIL import Image

    from diffusion_sae.world import bundle

    image, prompt = bundle.probe_dir("style", 7), bundle.probe_dir("style", 0, branch="cond")
    args = ["unlearn", "--concept", "striped", "--multiplier", "-10",
            "--top-n", 4, "--prompt", "a red star in striped style"]

    def images(name, *extra):
        ok(*args, *extra, "--save-images", tmp_path / name)
        return [np.asarray(Image.open(tmp_path / name / sub / "0.png"), dtype=np.int16)
                for sub in ("original", "unlearned")]

    original, none = images("none", "--detector", image, "--detector-threshold", "1")
    assert np.array_equal(none, original)
    _, every = images("every", "--detector", image, "--detector", prompt, "--detector-threshold", "1",
                      "--detector-threshold", "0")
    _, windowed = images("window", "--window", "1-25")
    assert np.abs(every - windowed).max() <= 1
    assert np.abs(every - original).max() > 8
    settings = json.loads((tmp_path / "every" / "index.json").read_text())["conditions"]["unlearned"]
    assert settings["detector"] == [str(image), str(prompt)] and settings["detector_threshold"] == [1.0, 0.0]
    # --rewind: the step-7 probe at bar 0 flags the sample late; it is redone with the edits from step 0, which is
    # the run without a detector (and not the gated image)
    _, gated = images("gated", "--detector", image, "--detector-threshold", "0")
    _, rewound = images("rewound", "--detector", image, "--detector-threshold", "0", "--rewind")
    _, whole = images("whole")
    assert np.abs(rewound - whole).max() <= 1 and np.abs(gated - whole).max() > 8
    assert json.loads((tmp_path / "rewound" / "index.json").read_text())["conditions"]["unlearned"]["rewind"] is True
    r = run(*args, "--rewind", "--out", tmp_path / "x.png")
    assert isinstance(r.exception, UserError) and "--rewind" in str(r.exception)


def test_tune_both_methods_small(tmp_path):
    out = ok("tune", "--method", "saeuron", "--kind", "style", "--concept", "striped", "--search", "grid",
             "--images", 8, "--top-n", "1", "--gammas", "-5")
    assert "striped" in out and "top_n=1" in out
    out = ok("tune", "--method", "saeuron", "--kind", "object", "--concept", "star", "--search", "halving",
             "--images", 8, "--top-n", "1,2", "--gammas", "-5", "--scalings", "mean,latent",
             "--blocks", "unet.up_blocks.1.attentions.1;unet.up_blocks.1.attentions.0+unet.up_blocks.1.attentions.1",
             "--min-fires", "1,2")
    assert "star" in out and "blocks=" in out and "min_fire=" in out
    r = run("tune", "--method", "steer", "--kind", "colour", "--no-gated", "--orthogonal")
    assert isinstance(r.exception, UserError) and "--orthogonal" in str(r.exception)
    r = run("tune", "--method", "steer", "--kind", "colour", "--contrast", "--orthogonal")
    assert isinstance(r.exception, UserError) and "--contrast replaces" in str(r.exception)
    out = ok("tune", "--method", "steer", "--kind", "colour", "--strengths", "-1,-0.5", "--images", 4,
             "--per-concept", "--out", tmp_path / "preset.json")
    assert "picked" in out
    preset = json.loads((tmp_path / "preset.json").read_text())
    # the gated sweep's table: params' own when they gate on the word, else beside it (v2 presets use a FamilyGate)
    table = preset["steer"] if preset["steer"].get("gate") else preset["steer"]["paper"]
    assert set(table["concepts"]["colour"].values()) <= {-1.0, -0.5}
    # one line per colour with the λ chosen for it, from the swept strengths
    per = [ln for ln in out.splitlines() if ln.strip().startswith(("red ", "green ", "blue "))]
    assert len(per) == 3 and all("λ=-1:" in ln or "λ=-0.5:" in ln for ln in per)


def test_tune_robust_presets_small(tmp_path):
    """robust-steer / robust-saeuron score candidates on named, implicit and rest prompts of the tuning split
    and write the kind's winner, from the swept values, into the preset."""
    r = run("tune", "--method", "robust-steer", "--kind", "colour", "--implicit=0,-0.5")
    assert isinstance(r.exception, UserError) and "--implicit" in str(r.exception)
    r = run("tune", "--method", "robust-saeuron", "--kind", "colour")
    assert isinstance(r.exception, UserError) and "colour" in str(r.exception)
    out = ok("tune", "--method", "robust-steer", "--kind", "colour", "--strengths=-1", "--implicit", "0,0.5",
             "--concepts-per-kind", 1, "--out", tmp_path / "p.json")
    assert "winner (colour)" in out
    steer = json.loads((tmp_path / "p.json").read_text())["steer"]
    assert steer["colour"] == -1.0 and steer["family"]["colour"] in (0.0, 0.5) and steer["match"] == "embedding"
    r = run("tune", "--method", "robust-steer", "--kind", "colour", "--match", "fuzzy")
    assert isinstance(r.exception, UserError) and "--match" in str(r.exception)
    r = run("tune", "--method", "robust-saeuron", "--kind", "style", "--windows", "5")
    assert isinstance(r.exception, UserError) and "--windows" in str(r.exception)
    out = ok("tune", "--method", "robust-saeuron", "--kind", "style", "--top-n", "16", "--gammas=-1", "--min-fires", "3",
             "--windows", "none;5-25", "--edits", "scale;replace", "--blocks", "unet.up_blocks.1.attentions.0",
             "--concepts-per-kind", 1, "--per-concept", "--out", tmp_path / "q.json")
    assert "winner (solid)" in out and "steps 5-25" in out
    # every candidate's axes per concept; replace ignores γ, so its candidates carry no γ in their names
    assert "named (plain)" in out and "n=16 replace latent/specific fire≥3 steps 5-25" in out
    assert sum(line.startswith("solid ") for line in out.splitlines()) == 4
    sa = json.loads((tmp_path / "q.json").read_text())["saeuron"]
    setting = {"blocks": ["unet.up_blocks.1.attentions.0"], "top_n": 16, "multiplier": -1.0, "scaling": "latent",
               "selection": "specific", "min_fire": 3}
    swept = [dict(setting, **w, **e) for w in ({}, {"window": [5, 25]}) for e in ({}, {"edit": "replace"})]
    for c in ("solid", "striped"):   # solid: its own winner; striped (not scored): the kind's
        assert sa[c] in swept


def test_tune_robust_steer_sweeps_from_steps_and_detectors(tmp_path, monkeypatch, capsys):
    """robust-steer sweeps λ × implicit × --from-steps × --detectors (a detector only with a later from step) and
    writes the winner's from step and detector for the kind, replacing the shipped ones; bad values are one line,
    exit code 2, before the model loads; --implicit takes fractions above 1."""
    import re

    from _cli import run_main

    from diffusion_sae.cli import benchmark as bench
    from diffusion_sae.world import bundle

    def no_model(*a, **k):
        raise AssertionError("model loaded")

    base = ["tune", "--method", "robust-steer", "--kind", "colour", "--strengths=-1", "--concepts-per-kind", 1]
    bad = ((["--detectors", "11"], "--detectors", "STEP:THRESHOLD"),
           (["--detectors", "none;6:0.2"], "--detectors", "probe step"),
           (["--detectors", "11:1.5"], "--detectors", "[0, 1]"),
           (["--detectors", ";"], "--detectors", "nothing"),
           (["--from-steps", "-1"], "--from-steps", ">= 0"),
           (["--from-steps", "0,x"], "--from-steps", "integers"),
           (["--from-steps", "0,6", "--detectors", "none;11:0.2"], "--from-steps", "not below any from step"))
    with monkeypatch.context() as m:
        m.setattr(bench, "load_model", no_model)
        for extra, opt, says in bad:
            code, _, err = run_main(base + extra, capsys)
            assert code == 2 and "\n" not in err and err.startswith("error: ") and opt in err and says in err, (extra, err)
        # a fraction above 1 passes the checks (and reaches the model)
        r = run(*base, "--implicit", "4", "--from-steps", "12", "--detectors", "11:0.2")
        assert isinstance(r.exception, AssertionError) and str(r.exception) == "model loaded"
    # the library refuses the same before any generation (no pipeline needed to get there)
    from diffusion_sae.world.tuning import TuneOptionError, robust_steer_settings, tune_robust_params

    with pytest.raises(TuneOptionError, match="not below any from step"):
        tune_robust_params(None, None, bundle.load_params(), "robust-steer", "colour", concepts_per_kind=1,
                           strengths=[-1.0], implicit=[1.0], from_steps=[0, 11], detectors=[None, (11, 0.2)])
    assert robust_steer_settings([-1.0], [1.0], [0, 12], [None, (11, 0.2)]) == [
        (-1.0, 1.0, None, "embedding", 0, None), (-1.0, 1.0, None, "embedding", 12, None),
        (-1.0, 1.0, None, "embedding", 12, (11, 0.2))]
    # a winner at step 0 without a detector drops the kind's shipped from step and detector (scoring stubbed)
    from diffusion_sae.world import robust_tune

    class Res:
        best = None

        def table(self):
            return []

    def fake_tune(pipe, clf, cands, cfg, paired, progress):
        Res.best = next(n for n in cands if "from step" not in n)
        return Res()

    with monkeypatch.context() as m:
        m.setattr(bundle, "load_text_sae", lambda *a, **k: None)
        m.setattr(robust_tune, "family_candidates", lambda pipe, sae, settings, kinds: {
            robust_tune.family_name(s[0], s[1], s[2], s[3], s[4], s[5]): None for s in settings})
        m.setattr(robust_tune, "tune", fake_tune)
        params = bundle.load_params()
        params["steer"].setdefault("family_negative", {})["colour"] = 0.5
        tune_robust_params(None, None, params, "robust-steer", "colour", concepts_per_kind=1, strengths=[-1.0],
                           implicit=[3.0], from_steps=[0, 12], detectors=[None, (11, 0.2)])
        steer = params["steer"]
        assert steer["family"]["colour"] == 3.0 and "colour" not in steer["family_from_step"]
        assert "colour" not in steer["family_detector"] and "colour" not in steer["family_negative"]
        assert steer["family_detector"]["style"] == bundle.load_params()["steer"]["family_detector"]["style"]
    # 3 candidates: from step 0 (no detector), 12, 12 with the step-11 probe (a detector from step 0 is left out)
    out = ok(*base, "--implicit", 1, "--from-steps", "0,12", "--detectors", "none;11:0.2", "--out", tmp_path / "p.json")
    rows = [ln for ln in out.splitlines() if "CS family gate" in ln and not ln.startswith("winner")]
    assert len(rows) == 3, out
    winner = next(ln for ln in out.splitlines() if ln.startswith("winner (colour): "))
    start = re.search(r" from step (\d+)", winner)
    det = re.search(r" where the step-(\d+) probe says p≥([0-9.]+)", winner)
    steer = json.loads((tmp_path / "p.json").read_text())["steer"]
    assert steer["colour"] == -1.0 and steer["family"]["colour"] == 1.0
    assert steer.get("family_from_step", {}).get("colour") == (int(start[1]) if start else None), (winner, steer)
    assert steer.get("family_detector", {}).get("colour") == (
        {"step": int(det[1]), "threshold": float(det[2])} if det else None), (winner, steer)
    shipped = bundle.load_params()["steer"]
    for k in ("style", "object"):   # the other kinds keep the shipped values
        assert steer["family_from_step"].get(k) == shipped["family_from_step"].get(k)
        assert steer["family_detector"].get(k) == shipped["family_detector"].get(k)


def test_tune_never_writes_into_the_package(tmp_path):
    from diffusion_sae.world import assets

    r = run("tune", "--method", "steer", "--kind", "colour", "--out", assets.sae_dir() / "params.json")
    assert isinstance(r.exception, UserError) and "inside the installed package" in str(r.exception)
    r = run("tune", "--method", "steer", "--kind", "colour", "--out", tmp_path)
    assert isinstance(r.exception, UserError) and "is a folder" in str(r.exception)


def test_kill_during_tune_leaves_no_partial_preset(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    exe = os.path.join(os.path.dirname(sys.executable), "diffusion-sae")
    out = tmp_path / "preset.json"
    proc = subprocess.Popen([exe, "tune", "--method", "steer", "--kind", "colour", "--strengths", "-1,-0.5",
                             "--images", "4", "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(8)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL          # killed mid-run, not finished
    assert list(tmp_path.iterdir()) == []          # nothing half-written: the preset is written once, atomically


def test_eval_shapes_smoke(tmp_path):
    out = ok("eval", "shapes", "--quick", "--concepts-per-kind", 1, "--no-faithful", "--attack-steps", 2,
             "--out", tmp_path / "r")
    assert "SAeUron style (ours)" in out and "Concept Steerers remove colour" in out
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Style unlearning" in md and "UA" in md
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert 0 <= res["base"]["colour"] <= 1 and res["images_generated"] > 100
    # collateral change as a Fréchet distance in the judge's feature space (named so: not FID), and cost
    assert "NOT FID" in md and res["fd_base_vs_rendered"] > 0
    assert all(r["fd_rest"] >= 0 for r in res["saeuron"]["style"]["ours"])
    assert res["cost"]["SAeUron"]["per_image_s"] > 0 and res["cost"]["storage_bytes"]["SAeUron"] > 0
    assert "steer_paper" in res and "family gate: implicit" in md
    # the generalization table: every method, named / implicit / adversarial columns, worst per axis
    g = res["generalization"]
    assert len(g["rows"]) == 6 and "Generalization" in md and "worst:" in out and "mean bar violation" in md
    assert "Concept Steerers (no probe: 0.2 from step 8 on every sample)" in g["rows"]   # the previous preset beside it
    solid = next(r for r in g["rows"]["SAeUron (shipped)"] if r["concept"] == "solid")
    assert 0 <= solid["implicit_plain"] <= 1 and 0 <= solid["adversarial"] <= 1 and 0 <= solid["tv_other"] <= 1
    assert all(r["kind"] != "colour" for r in g["rows"]["SAeUron (shipped)"])
    # --no-grid: the generalization table alone
    ok("eval", "shapes", "--quick", "--no-grid", "--concepts-per-kind", 1, "--attack-concepts", 0, "--implicit", 4,
       "--out", tmp_path / "g")
    md = (tmp_path / "g" / "report.md").read_text()
    assert "Generalization" in md and "Style unlearning" not in md
    res = json.loads((tmp_path / "g" / "results.json").read_text())
    assert "base" not in res
    assert res["generalization"]["settings"]["implicit"] == res["generalization"]["settings"]["empty"] == 4
    r = run("eval", "shapes", "--no-grid", "--no-generalization", "--out", tmp_path / "x")
    assert isinstance(r.exception, UserError) and "nothing to measure" in str(r.exception)
    r = run("eval", "shapes", "--implicit", 0, "--out", tmp_path / "y")
    assert isinstance(r.exception, UserError) and "--implicit 0" in str(r.exception)
    assert not (tmp_path / "y").exists()


def test_demo_writes_its_files(tmp_path):
    out = ok("demo", "--out", tmp_path / "demo", "--seeds", 1)
    for f in ("before_after.png", "strength_sweep.png", "report.md", "report.html", "results.json"):
        assert (tmp_path / "demo" / f).exists(), f
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(res) >= {"remove_style", "unlearn_object", "add_style", "sweep"}
    assert "Concept Steerers removes" in out


def test_steer_ablate_features_changes_a_named_prompt_and_bad_values_fail_in_one_line(tmp_path, capsys):
    """--ablate-features N reaches the steering: at λ = 0 (S is zero) the only change is the concept's N text-SAE
    features taken out, which moves a prompt naming the concept; bad values and λ > 0 are refused before anything
    is written (one line, exit code 2)."""
    from _cli import run_main

    import numpy as np
    from PIL import Image

    args = ["steer", "--concept", "square", "--strength", "0", "--prompt", "a red square in striped style", "--steps", 6]

    def image(name, *extra):
        ok(*args, *extra, "--save-images", tmp_path / name)
        return np.asarray(Image.open(tmp_path / name / "0.png"), dtype=np.int16)

    base, ablated = image("base"), image("ablated", "--ablate-features", 16)
    assert np.abs(ablated - base).max() > 8
    for extra, says in ((("--ablate-features", 0), "--ablate-features must be"),
                        (("--ablate-ceiling", "0.9"), "only acts with --ablate-features"),
                        (("--ablate-features", 4, "--ablate-ceiling", "2"), "quantile")):
        code, _, err = run_main([str(a) for a in (*args, *extra, "--save-images", tmp_path / "bad")], capsys)
        assert code == 2 and "\n" not in err and says in err, (extra, err)
    code, _, err = run_main(["steer", "--concept", "square", "--strength", "1", "--prompt", "a red square",
                             "--ablate-features", "4", "--save-images", str(tmp_path / "bad")], capsys)
    assert code == 2 and "strengths <= 0" in err
    assert not (tmp_path / "bad").exists()
