"""Every bad input is one clear line (issue 23): exit code 2, a single `error: ...` line on stderr that
names the problem, no traceback, nothing written or removed anywhere (the working folder, --out, the
inputs), and the installed package folder unchanged.

The commands run in-process (tests/_cli.py) in an empty working folder; every case fails before an
image is generated (or after at most one 1-step image), so the module stays fast.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusion_sae
from _cli import run_main

PKG = Path(diffusion_sae.__file__).resolve().parent
BLOCK = "unet.up_blocks.1.attentions.1"


def _tree(root: Path) -> dict:
    """Files below root with size and mtime (the package: data files only, since other work may edit code)."""
    out = {}
    for p in root.rglob("*"):
        if "__pycache__" in p.parts or (root == PKG and p.suffix in (".py", ".pyc")):
            continue
        st = p.lstat()
        # folders: existence only (a temporary entry made and removed again changes a folder's mtime)
        out[str(p.relative_to(root))] = (True, 0, 0) if p.is_dir() else (False, st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Hostile inputs, made once: files of the wrong kind, damaged SAEs and dictionaries, odd arrays."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "prompts.txt").write_text("a red circle in solid style\n")
    (d / "a_folder").mkdir()
    (d / "a_file").write_text("not a folder\n")
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (d / "list.json").write_text("[1, 2, 3]")
    (d / "corrupt.json").write_text('{"striped": ["a striped')
    (d / "latin1.json").write_bytes('{"caf\xe9": ["caf\xe9"]}'.encode("latin-1"))
    (d / "empty_concept.json").write_text('{"striped": []}')
    (d / "one_concept.json").write_text('{"striped": ["a red star in striped style"]}')
    (d / "two_concepts.json").write_text('{"striped": ["a red star in striped style"], "dotted": ["a red star in dotted style"]}')
    user = d / "my_results"
    user.mkdir()
    (user / "notes.txt").write_text("a week of work")
    # activations a new user might hand to train-sae
    for name, arr in (("zero_d", np.float32(3.0)), ("huge", (np.random.default_rng(0).standard_normal((512, 16)) * 1e20).astype("float32"))):
        (d / name).mkdir()
        np.save(d / name / "a.npy", arr)
    (d / "objects").mkdir()
    np.save(d / "objects" / "a.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (d / "good_acts").mkdir()
    np.save(d / "good_acts" / "a.npy", np.random.default_rng(0).standard_normal((256, 16)).astype("float32"))

    class Code:  # a pickle that runs code when loaded
        def __reduce__(self):
            return (print, ("this ran",))

    (d / "code_pickle").mkdir()
    torch.save({"x": torch.zeros(4, 16), "y": Code()}, d / "code_pickle" / "a.pt")
    # damaged copies of the bundled block SAE and its dictionary
    from diffusion_sae.world import assets

    src = assets.sae_dir() / BLOCK
    for name in ("sae_cfg_list", "sae_nan", "dict_corrupt", "dict_nan"):
        shutil.copytree(src, d / name)
    (d / "sae_cfg_list" / "cfg.json").write_text("[1, 2]")
    w = load_file(str(d / "sae_nan" / "sae.safetensors"))
    key = next(iter(w))
    w[key] = w[key].clone()
    w[key].view(-1)[0] = float("nan")
    save_file(w, str(d / "sae_nan" / "sae.safetensors"))
    (d / "dict_corrupt" / "concept_dictionary_style.json").write_text("{\"hookpoint\": ")
    shutil.copytree(assets.sae_dir() / "probes" / "style-step7", d / "probe_not_a_probe")
    (d / "probe_not_a_probe" / "concept_probe.json").write_text('{"hookpoint": 3}')
    t = load_file(str(d / "dict_nan" / "concept_dictionary_style.safetensors"))
    t["means"] = t["means"].clone()
    t["means"].view(-1)[0] = float("nan")
    save_file(t, str(d / "dict_nan" / "concept_dictionary_style.safetensors"))
    # a dictionary written whole with NaN in it (its JSON records the new file's hash), not a torn pair
    meta_path = d / "dict_nan" / "concept_dictionary_style.json"
    meta = json.loads(meta_path.read_text())
    if "tensors_sha256" in meta:
        meta["tensors_sha256"] = hashlib.sha256((d / "dict_nan" / "concept_dictionary_style.safetensors").read_bytes()).hexdigest()
        meta_path.write_text(json.dumps(meta))
    return d


def _busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


TINY = ["collect", "--model", "tiny:sd", "--hookpoint", BLOCK, "--prompts", "{i}/prompts.txt", "--out", "{o}/acts"]
STEER = ["steer", "--concept", "striped", "--prompt", "a circle", "--steps", "1", "--out", "{o}/steer.png"]
UNLEARN = ["unlearn", "--concept", "circle", "--prompt", "a circle", "--steps", "1", "--out", "{o}/u.png"]
STYLE_DICT = ["--dictionary-name", "concept_dictionary_style"]
PROBE = ["concepts", "probe", "--prompts", "{i}/two_concepts.json", "--step", "1", "--steps", "2", "--out", "{o}/p"]
STYLE_PROBE = f"{PKG}/world/assets/saes/probes/style-step7"     # read only
STYLE_COND_PROBE = f"{PKG}/world/assets/saes/probes/style-cond-step0"
GATED = ["steer", "--concept", "striped", "--prompt", "a circle", "--steps", "10", "--out", "{o}/steer.png",
         "--rival", "dotted", "--concept-word", "striped", "--implicit", "0.5"]

# (id, arguments, text the one error line must contain)
CASES = [
    # --- severe: dashboard export never deletes a user's folder
    ("dashboard-user-folder", ["dashboard", "export", "--out", "{i}/my_results"], "not a dashboard export"),
    ("dashboard-a-file", ["dashboard", "export", "--out", "{i}/a_file"], "not a folder"),
    ("dashboard-in-package", ["dashboard", "export", "--out", f"{PKG}/world/assets/dash"], "inside the installed"),
    ("dashboard-n-features-0", ["dashboard", "export", "--out", "{o}/d", "--n-features", "0"], "--n-features"),
    ("dashboard-features-text", ["dashboard", "export", "--out", "{o}/d", "--features", "a,b"], "--features"),
    # --- severe: concepts build never writes into the package
    ("concepts-no-out", ["concepts", "build", "--shapes", "style"], "give --out"),
    ("concepts-out-in-package", ["concepts", "build", "--shapes", "style", "--out", f"{PKG}/world/assets/saes/{BLOCK}"],
     "inside the installed"),
    ("concepts-sae-in-package", ["concepts", "build", "--shapes", "style", "--sae", f"{PKG}/world/assets/saes/{BLOCK}"],
     "inside the installed"),
    ("concepts-out-a-file", ["concepts", "build", "--shapes", "style", "--out", "{i}/a_file"], "not a folder"),
    ("concepts-json-list", ["concepts", "build", "--concepts", "{i}/list.json", "--out", "{o}/d"], "expected a JSON object"),
    ("concepts-json-corrupt", ["concepts", "build", "--concepts", "{i}/corrupt.json", "--out", "{o}/d"], "not valid JSON"),
    ("concepts-json-latin1", ["concepts", "build", "--concepts", "{i}/latin1.json", "--out", "{o}/d"], "not UTF-8"),
    ("concepts-json-folder", ["concepts", "build", "--concepts", "{i}/a_folder", "--out", "{o}/d"], "--concepts"),
    ("concepts-empty-concept", ["concepts", "build", "--concepts", "{i}/empty_concept.json", "--out", "{o}/d"],
     "non-empty prompt"),
    ("concepts-shapes-bogus", ["concepts", "build", "--shapes", "bogus", "--out", "{o}/d"], "--shapes"),
    ("concepts-steps-0", ["concepts", "build", "--shapes", "style", "--out", "{o}/d", "--steps", "0"], "--steps"),
    ("concepts-per-concept-0", ["concepts", "build", "--shapes", "style", "--out", "{o}/d", "--per-concept", "0"],
     "--per-concept"),
    # --- severe: collect validates every option before a store exists
    ("collect-branch-bogus", [*TINY, "--branch", "bogus"], "--branch"),
    ("collect-steps-0", [*TINY, "--steps", "0"], "--steps"),
    ("collect-steps-negative", [*TINY, "--steps", "-3"], "--steps"),
    ("collect-tokens-per-record-0", [*TINY, "--tokens-per-record", "0"], "--tokens-per-record"),
    ("collect-tokens-per-record-neg", [*TINY, "--tokens-per-record", "-5"], "--tokens-per-record"),
    ("collect-keep-steps-text", [*TINY, "--keep-steps", "a,b"], "--keep-steps"),
    ("collect-keep-steps-late", [*TINY, "--steps", "2", "--keep-steps", "99"], "past the last step"),
    ("collect-batch-size-0", [*TINY, "--batch-size", "0"], "--batch-size"),
    ("collect-guidance-nan", [*TINY, "--guidance", "nan"], "--guidance"),
    ("collect-height-odd", [*TINY, "--height", "30"], "--height"),
    ("collect-prompts-folder", [*TINY[:6], "{i}/a_folder", *TINY[7:]], "is a folder"),
    ("collect-out-a-file", [*TINY[:8], "{i}/a_file"], "is a file"),
    # --- train-sae
    ("train-npy-0d", ["train-sae", "{i}/zero_d"], "0-d"),
    ("train-npy-objects", ["train-sae", "{i}/objects"], "Python objects"),
    ("train-pickle-with-code", ["train-sae", "{i}/code_pickle"], "refused: this file holds code, not just tensors"),
    ("train-lr-nan", ["train-sae", "{i}/good_acts", "--lr", "nan"], "--lr"),
    ("train-lr-negative", ["train-sae", "{i}/good_acts", "--lr", "-1"], "--lr"),
    ("train-huge-activations", ["train-sae", "{i}/huge", "--batch-size", "256", "--k", "4"], "too large for float32"),
    ("train-out-a-file", ["train-sae", "{i}/good_acts", "--out", "{i}/a_file"], "is a file"),
    ("train-batch-size-0", ["train-sae", "{i}/good_acts", "--batch-size", "0"], "batch_size"),
    ("train-synthetic-k-0", ["train-sae", "--synthetic", "--k", "0", "--synthetic-tokens", "1000"], "k must be"),
    ("train-text-sae-epochs-0", ["train-text-sae", "--model", "tiny:sd", "--prompts", "{i}/prompts.txt", "--out",
                                 "{o}/t", "--epochs", "0"], "--epochs"),
    ("train-block-sae-steps-0", ["train-block-sae", "--model", "tiny:sd", "--prompts", "{i}/prompts.txt", "--out",
                                 "{o}/b", "--steps", "0"], "--steps"),
    ("dashboard-stats-steps-0", ["dashboard", "export", "--out", "{o}/d", "--stats-steps", "0"], "--stats-steps"),
    ("dashboard-per-concept-0", ["dashboard", "export", "--out", "{o}/d", "--per-concept", "0"], "--per-concept"),
    # --- steer: every option checked before an image is made
    ("steer-strength-nan", [*STEER, "--strength", "nan"], "--strength"),
    ("steer-strength-inf", [*STEER, "--strength", "inf"], "--strength"),
    ("steer-strengths-comma", [*STEER, "--strengths", ","], "--strengths"),
    ("steer-strengths-nan", [*STEER, "--strengths", "-1,nan"], "--strengths"),
    ("steer-guidance-nan", [*STEER, "--guidance", "nan"], "--guidance"),
    ("steer-steps-0", [*STEER, "--steps", "0"], "--steps"),
    ("steer-steps-negative", [*STEER, "--steps", "-2"], "--steps"),
    ("steer-out-extension", [*STEER[:-1], "{o}/grid.txt"], "unknown file type"),
    ("steer-out-folder", [*STEER[:-1], "{i}/a_folder"], "is a folder"),
    ("steer-out-unwritable", [*STEER[:-1], "{i}/a_file/grid.png"], "cannot write"),
    ("steer-concept-file-latin1", ["steer", "--concept-file", "{i}/latin1.txt", "--prompt", "x", "--steps", "1",
                                   "--out", "{o}/s.png"], "not UTF-8"),
    ("steer-concept-file-folder", ["steer", "--concept-file", "{i}/a_folder", "--prompt", "x", "--steps", "1",
                                   "--out", "{o}/s.png"], "--concept-file"),
    ("steer-prompts-folder", ["steer", "--concept", "striped", "--prompts", "{i}/a_folder", "--steps", "1",
                              "--out", "{o}/s.png"], "is a folder"),
    ("steer-save-images-a-file", [*STEER[:-2], "--strength", "-1", "--save-images", "{i}/a_file"], "is a file"),
    ("steer-match-bogus", [*STEER, "--rival", "dotted", "--concept-word", "striped", "--match", "fuzzy"], "--match"),
    ("steer-implicit-text", [*STEER, "--rival", "dotted", "--concept-word", "striped", "--implicit", "half"],
     "--implicit"),
    ("steer-implicit-negative-nan", [*STEER, "--rival", "dotted", "--concept-word", "striped",
                                     "--implicit-negative", "nan"], "--implicit-negative"),
    ("steer-implicit-from-step-negative", [*STEER, "--rival", "dotted", "--concept-word", "striped",
                                           "--implicit-from-step", "-1"], "--implicit-from-step"),
    ("steer-implicit-from-step-text", [*STEER, "--rival", "dotted", "--concept-word", "striped",
                                       "--implicit-from-step", "8.5"], "--implicit-from-step"),
    ("steer-implicit-from-step-past-the-steps", [*STEER, "--rival", "dotted", "--concept-word", "striped",
                                                 "--implicit-from-step", "1"], "is not below --steps"),
    ("steer-implicit-from-step-no-rival", [*STEER, "--implicit-from-step", "2"], "only acts with --rival"),
    ("steer-rival-no-concept-word", [*STEER, "--rival", "dotted"], "--concept-word"),
    ("steer-rival-and-gate", [*STEER, "--rival", "dotted", "--concept-word", "striped", "--gate", "striped"],
     "exclusive"),
    ("steer-concept-word-no-rival", [*STEER, "--concept-word", "striped"], "only acts with --rival"),
    # --- steer --detector: the probe is read and checked before the model loads
    ("steer-detector-missing", [*GATED, "--implicit-from-step", "8", "--detector", "{i}/a_folder"],
     "--detector: no concept probe"),
    ("steer-detector-not-a-probe", [*GATED, "--implicit-from-step", "8", "--detector", "{i}/probe_not_a_probe"],
     "probe_not_a_probe/concept_probe.json: not a concept probe"),
    ("steer-detector-no-from-step", [*GATED, "--detector", STYLE_PROBE], "needs --implicit-from-step >= 1"),
    ("steer-detector-step-not-before", [*GATED, "--implicit-from-step", "7", "--detector", STYLE_PROBE],
     "reads step 7"),
    ("steer-detector-other-concepts", [*STEER[:-4], "--steps", "10", "--out", "{o}/steer.png", "--rival", "dog",
                                       "--concept-word", "cat", "--implicit-from-step", "8", "--detector", STYLE_PROBE],
     "none of --concept-word"),
    ("steer-detector-no-rival", [*STEER, "--detector", STYLE_PROBE], "--detector only acts with --rival"),
    ("steer-detector-threshold-high", [*GATED, "--implicit-from-step", "8", "--detector", STYLE_PROBE,
                                       "--detector-threshold", "1.5"], "--detector-threshold must be a probability"),
    ("steer-detector-threshold-text", [*GATED, "--implicit-from-step", "8", "--detector", STYLE_PROBE,
                                       "--detector-threshold", "half"], "--detector-threshold must be a number"),
    ("steer-detector-threshold-alone", [*GATED, "--implicit-from-step", "8", "--detector-threshold", "0.7"],
     "--detector-threshold only acts with --detector"),
    ("steer-detector-threshold-count", [*GATED, "--implicit-from-step", "8", "--detector", STYLE_PROBE, "--detector",
                                        STYLE_COND_PROBE, *["--detector-threshold", "0.2"] * 3],
     "--detector-threshold is given 3 times for 2 --detector"),
    ("steer-second-detector-step-not-before", [*GATED, "--implicit-from-step", "7", "--detector", STYLE_COND_PROBE,
                                               "--detector", STYLE_PROBE], "reads step 7"),
    # --- steer --named-late: a factor > 0 on S, only with --detector
    ("steer-named-late-0", [*GATED, "--implicit-from-step", "8", "--detector", STYLE_PROBE, "--named-late", "0"],
     "--named-late must be a factor > 0"),
    ("steer-named-late-negative", [*GATED, "--implicit-from-step", "8", "--detector", STYLE_PROBE,
                                   "--named-late", "-2"], "--named-late must be a factor > 0"),
    ("steer-named-late-nan", [*GATED, "--implicit-from-step", "8", "--detector", STYLE_PROBE, "--named-late", "nan"],
     "--named-late must be a finite number"),
    ("steer-named-late-text", [*GATED, "--implicit-from-step", "8", "--detector", STYLE_PROBE, "--named-late", "lots"],
     "--named-late must be a number"),
    ("steer-named-late-no-detector", [*GATED, "--implicit-from-step", "8", "--named-late", "4"],
     "--named-late only acts with --detector"),
    ("steer-named-late-no-rival", [*STEER, "--named-late", "4"], "--named-late only acts with --rival"),
    # --- concepts probe: never writes into the package; every option checked before the model loads
    ("probe-no-out", PROBE[:-2], "give --out"),
    ("probe-out-in-package", [*PROBE[:-1], f"{PKG}/world/assets/saes/probes/new"], "inside the installed"),
    ("probe-out-a-file", [*PROBE[:-1], "{i}/a_file"], "not a folder"),
    ("probe-no-prompts", ["concepts", "probe", "--step", "1", "--out", "{o}/p"], "exactly one of --prompts"),
    ("probe-prompts-and-kind", [*PROBE, "--kind", "style"], "exactly one of --prompts"),
    ("probe-kind-bogus", ["concepts", "probe", "--kind", "shade", "--step", "1", "--out", "{o}/p"], "--kind"),
    ("probe-branch-bogus", [*PROBE, "--branch", "image"], "--branch must be uncond or cond"),
    ("probe-no-step", [*PROBE[:4], *PROBE[6:]], "give --step"),
    ("probe-step-past-the-steps", [*PROBE, "--step", "2"], "--step 2 is not one of the sampler's 2 steps"),
    ("probe-step-negative", [*PROBE, "--step", "-1"], "--step -1"),
    ("probe-steps-0", [*PROBE, "--steps", "0"], "--steps"),
    ("probe-guidance-nan", [*PROBE, "--guidance", "nan"], "--guidance"),
    ("probe-per-concept-0", ["concepts", "probe", "--kind", "style", "--step", "1", "--per-concept", "0",
                             "--out", "{o}/p"], "--per-concept"),
    ("probe-seed-start-negative", [*PROBE, "--seed-start", "-1"], "--seed-start"),
    ("probe-prompts-list", [*PROBE[:3], "{i}/list.json", *PROBE[4:]], "expected a JSON object"),
    ("probe-prompts-corrupt", [*PROBE[:3], "{i}/corrupt.json", *PROBE[4:]], "not valid JSON"),
    ("probe-prompts-latin1", [*PROBE[:3], "{i}/latin1.json", *PROBE[4:]], "not UTF-8"),
    ("probe-prompts-one-concept", [*PROBE[:3], "{i}/one_concept.json", *PROBE[4:]], "at least two concepts"),
    ("probe-other-model-no-hookpoint", [*PROBE, "--model", "tiny:sd"], "give --hookpoint"),
    ("probe-hookpoint-text", [*PROBE, "--hookpoint", "text_encoder.text_model.encoder.layers.3"],
     "is not a denoiser block"),
    ("probe-hookpoint-unknown", [*PROBE, "--hookpoint", "unet.up_blocks.9"], "--hookpoint: unknown hookpoint"),
    # --- unlearn
    ("unlearn-top-n-negative", [*UNLEARN, "--top-n", "-2"], "--top-n"),
    ("unlearn-top-n-0", [*UNLEARN, "--top-n", "0"], "--top-n"),
    ("unlearn-top-n-huge", [*UNLEARN, "--top-n", "100000"], "--top-n"),
    ("unlearn-multiplier-nan", [*UNLEARN, "--multiplier", "nan"], "--multiplier"),
    ("unlearn-percentile-100", [*UNLEARN, "--percentile", "100"], "--percentile"),
    ("unlearn-window-text", [*UNLEARN, "--window", "early"], "--window"),
    ("unlearn-window-three-parts", [*UNLEARN, "--window", "1-2-3"], "--window"),
    ("unlearn-window-reversed", [*UNLEARN, "--window", "25-5"], "--window"),
    ("unlearn-window-past-the-steps", [*UNLEARN, "--window", "5-25"], "--window"),
    ("unlearn-edit-unknown", [*UNLEARN, "--edit", "swap"], "--edit must be scale, replace, replace_patch or mean_patch"),
    ("unlearn-edit-replace-with-add", [*UNLEARN, "--edit", "replace", "--add"], "--edit replace"),
    ("unlearn-edit-replace-patch-faithful", [*UNLEARN, "--edit", "replace_patch", "--faithful"], "drop --faithful"),
    ("unlearn-edit-mean-patch-with-add", [*UNLEARN, "--edit", "mean_patch", "--add"], "--edit mean_patch"),
    ("tune-edits-unknown", ["tune", "--method", "robust-saeuron", "--edits", "scale;swap"], "--edits"),
    ("tune-edits-patch-typo", ["tune", "--method", "robust-saeuron", "--edits", "scale;mean-patch"], "'mean_patch'"),
    ("unlearn-out-extension", [*UNLEARN[:-1], "{o}/u.gif"], "unknown file type"),
    ("unlearn-guidance-nan", [*UNLEARN, "--guidance", "nan"], "--guidance"),
    ("unlearn-sae-cfg-list", [*UNLEARN, "--sae", "{i}/sae_cfg_list"], "expected a JSON object"),
    ("unlearn-sae-nan", [*UNLEARN, "--sae", "{i}/sae_nan"], "NaN or inf"),
    ("unlearn-dictionary-missing", [*UNLEARN, "--dictionary", "{i}/a_folder"], "no concept dictionary"),
    ("unlearn-dictionary-corrupt", [*UNLEARN, "--dictionary", "{i}/dict_corrupt", *STYLE_DICT],
     "not a readable concept-dictionary JSON"),
    ("unlearn-dictionary-nan", [*UNLEARN, "--dictionary", "{i}/dict_nan", *STYLE_DICT], "NaN or inf"),
    # --- unlearn --detector: the probes are read and checked before the model loads
    ("unlearn-detector-missing", [*UNLEARN, "--detector", "{i}/a_folder"], "--detector: no concept probe"),
    ("unlearn-detector-not-a-probe", [*UNLEARN, "--detector", "{i}/probe_not_a_probe"], "not a concept probe"),
    ("unlearn-detector-other-concepts", [*UNLEARN[:5], "--out", "{o}/u.png", "--detector", STYLE_PROBE],
     "fitted on solid, striped"),
    ("unlearn-detector-step-past-the-steps", [*UNLEARN, "--detector", STYLE_PROBE], "reads step 7: of --steps 1"),
    ("unlearn-detector-faithful", [*UNLEARN, "--detector", STYLE_COND_PROBE, "--faithful"], "drop --faithful"),
    ("unlearn-detector-add", [*UNLEARN, "--detector", STYLE_COND_PROBE, "--add"], "drop --add"),
    ("unlearn-detector-threshold-high", [*UNLEARN, "--detector", STYLE_COND_PROBE, "--detector-threshold", "2"],
     "--detector-threshold must be a probability"),
    ("unlearn-detector-threshold-count", [*UNLEARN, "--detector", STYLE_COND_PROBE,
                                          *["--detector-threshold", "0.2"] * 2],
     "--detector-threshold is given 2 times for 1 --detector"),
    ("unlearn-detector-threshold-alone", [*UNLEARN, "--detector-threshold", "0.2"],
     "--detector-threshold only acts with --detector"),
    # --- world
    ("world-eval-model-missing", ["world", "eval", "--model", "{i}/no_such_model", "--out", "{o}/w.png"], "--model"),
    ("world-eval-steps-0", ["world", "eval", "--steps", "0", "--out", "{o}/w.png"], "--steps"),
    ("world-prompts-onto-folder", ["world", "prompts", "--out", "{i}/a_folder"], "is a folder"),
    ("world-prompts-unwritable", ["world", "prompts", "--out", "{i}/a_file/p.csv", "--n", "5"], "cannot write"),
    ("world-prompts-n-0", ["world", "prompts", "--out", "{o}/p.csv", "--n", "0"], "--n"),
    ("eval-fid-steps-0", ["eval", "fid", "--out", "{o}/r", "--reference", "{i}/a_folder", "--model", "tiny:sd",
                          "--steps", "0"], "--steps"),
    ("eval-clip-height-odd", ["eval", "clip-score", "--out", "{o}/r", "--prompts", "{i}/prompts.txt", "--clip",
                              "{i}/a_folder", "--model", "tiny:sd", "--height", "30"], "--height"),
    # --- ui
    ("ui-port-out-of-range", ["ui", "--port", "99999"], "--port"),
    ("ui-port-0", ["ui", "--port", "0"], "--port"),
    ("ui-port-in-use", ["ui", "--port", "{busy}"], "--port"),
]


@pytest.fixture(scope="module")
def package_before():
    return _tree(PKG)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, inputs, package_before, tmp_path, capsys, monkeypatch):
    name, args, needle = case
    cwd = tmp_path / "cwd"
    outdir = tmp_path / "out"
    cwd.mkdir()
    outdir.mkdir()
    monkeypatch.chdir(cwd)
    busy = _busy_port()
    try:
        argv = [a.format(i=inputs, o=outdir, busy=busy.getsockname()[1]) for a in args]
        before = {"inputs": _tree(inputs), "tmp": _tree(tmp_path)}
        code, out, err = run_main(argv, capsys)
    finally:
        busy.close()
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle.lower() in lines[0].lower(), lines[0]
    assert "\x1b[" not in lines[0], "ANSI codes in the message"
    # nothing written or removed: the working folder, --out, the inputs, the package
    assert _tree(tmp_path) == before["tmp"], f"{name} wrote or removed files beside its inputs"
    assert _tree(inputs) == before["inputs"], f"{name} changed its inputs"
    assert _tree(PKG) == package_before, f"{name} changed the installed package"


def test_a_kill_during_concepts_build_never_leaves_a_mixed_or_partial_dictionary(tmp_path, monkeypatch, capsys):
    """Killed while building: nothing is written. Killed between the two renames of the save: the old
    JSON with the new tensors is refused as a mismatched pair (never silently mixed), and a rerun of the
    same command writes a whole dictionary."""
    from diffusion_sae.concepts import dictionary as dmod

    out = tmp_path / "dict"
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"red": ["a red circle in solid style"], "blue": ["a blue circle in solid style"]}))
    args = ["concepts", "build", "--concepts", groups, "--steps", "1", "--out", out]
    calls = {"n": 0}

    def killed_progress(*a, **k):
        raise KeyboardInterrupt

    real_build = dmod.build_concept_dictionary
    monkeypatch.setattr(dmod, "build_concept_dictionary",
                        lambda *a, **k: real_build(*a, **{**k, "progress": killed_progress}))
    code, _, _ = run_main(args, capsys)  # the interrupt ends the command (exit code 130, as for Ctrl-C)
    assert code == 130
    assert not out.exists() or not any(out.iterdir())
    monkeypatch.setattr(dmod, "build_concept_dictionary", real_build)
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    first = dmod.ConceptDictionary.load(out, name="concept_dictionary")

    real_replace = dmod.os.replace

    def killed_replace(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # the tensors are in place, the JSON is not
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(dmod.os, "replace", killed_replace)
    code, _, _ = run_main([*args[:-2], "--seed", "5", "--out", out], capsys)
    assert code == 130 and calls["n"] == 2
    monkeypatch.setattr(dmod.os, "replace", real_replace)
    code, _, err = run_main(["unlearn", "--concept", "red", "--dictionary", out, "--prompt", "x", "--steps", "1",
                             "--out", tmp_path / "u.png"], capsys)
    assert code == 2 and "does not belong to" in err and len(err.splitlines()) == 1, err
    assert not list(out.glob("*.tmp"))
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    again = dmod.ConceptDictionary.load(out, name="concept_dictionary")
    assert torch.equal(again.means, first.means)


def test_steer_onto_a_full_disk_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch, capsys):
    import errno

    from diffusion_sae.eval import report

    def full(fig, path, dpi=120):
        Path(path).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "save_figure", full)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(["steer", "--concept", "striped", "--prompt", "a circle", "--steps", "1", "--strength",
                             "-1", "--out", tmp_path / "grid.png"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: cannot write {tmp_path / 'grid.png'}: No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_error_lines_carry_no_terminal_codes(tmp_path, monkeypatch, capsys):
    from diffusion_sae.cli import ui as cli_ui
    from diffusion_sae.errors import DiffusionSAEError

    def coloured(*a, **k):
        raise DiffusionSAEError("\x1b[1;31mbad\x1b[0m value\nsecond line")

    monkeypatch.setattr(cli_ui, "_ui_engine", coloured)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(["dashboard", "export", "--out", "fresh-dir-never-made"], capsys)
    assert (code, err) == (2, "error: bad value second line")
