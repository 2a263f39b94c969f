"""`diffusion-sae collect`: activations at hookpoints into resumable on-disk stores."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from .common import DEVICE_OPT, DTYPE_OPT, OFFLOAD_OPT, dtype_name, fail, progress_bar


def collect_cmd(model: str = typer.Option(..., help="Pipeline folder, hub id, or tiny:sd|sdxl|sd3|flux."),
                hookpoint: list[str] = typer.Option(..., help="Hookpoint name (repeatable), e.g. "
                                                    "unet.up_blocks.1.attentions.1 or text_encoder.text_model.encoder.layers.9"),
                prompts: Path = typer.Option(..., help="Text file (one prompt a line) or CSV with a prompt column."),
                out: Path = typer.Option(..., help="Output folder: one store per hookpoint."),
                steps: int = 50, guidance: float = 7.5,
                branch: list[str] = typer.Option(["cond"], help="Guidance branches to keep (cond, uncond)."),
                keep_steps: Optional[str] = typer.Option(None, help="Comma-separated step indices to keep (default all)."),
                tokens_per_record: Optional[int] = typer.Option(None, help="Random subset of patches per record."),
                batch_size: int = 1, height: Optional[int] = None,
                width: Optional[int] = None, negative_prompt: Optional[str] = None, column: str = "prompt",
                seed: int = typer.Option(0, help="Seed of row i when the file gives none: seed + i."),
                shard_mb: float = 128.0, max_sequence_length: Optional[int] = None,
                list_hookpoints: bool = typer.Option(False, "--list-hookpoints", help="Print the model's hookpoints and exit."),
                store_dtype: Optional[str] = typer.Option(None, help="Activation storage dtype: float16, bfloat16 or "
                                                          "float32 (default: --dtype when it names one, else float16)."),
                check_disk: bool = typer.Option(True, "--check-disk/--no-check-disk", help="Collect the first prompt "
                                                "into a temporary folder first, and refuse when prompts x its size will "
                                                "not fit on the output's disk."),
                device: str = DEVICE_OPT, dtype: str = DTYPE_OPT, offload: str = OFFLOAD_OPT):
    """Collect activations at hookpoints over a prompt set into resumable on-disk stores.

    Rerun the same command to resume. Under `accelerate launch` prompts are split over processes.
    """
    from ..activations import CollectConfig, PromptFileError, StoreError, collect, load_prompts
    from ..models import HookpointError, list_hookpoints as _list
    from ..models.loading import ModelLoadError, load_pipeline

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    barrier = None
    if world > 1:
        from accelerate import PartialState

        state = PartialState(cpu=True) if not os.environ.get("CUDA_VISIBLE_DEVICES") else PartialState()
        rank, world, barrier = state.process_index, state.num_processes, state.wait_for_everyone
    if not list_hookpoints:  # every option is checked before the model loads and before --out is touched
        from ..activations.collect import parse_keep_steps

        try:
            CollectConfig(hookpoints=list(hookpoint), steps=steps, guidance=guidance, branches=tuple(branch),
                          keep_steps=parse_keep_steps(keep_steps), tokens_per_record=tokens_per_record,
                          batch_size=batch_size, dtype=store_dtype or "float16", height=height, width=width,
                          shard_mb=shard_mb, max_sequence_length=max_sequence_length)
        except StoreError as e:
            fail(str(e))
        if out.exists() and not out.is_dir():
            fail(f"--out {out} is a file; give a folder (one store per hookpoint is made inside it)")
    try:
        ps = load_prompts(prompts, column=column, default_seed=seed)
        pipe = load_pipeline(model, device=device, dtype=dtype, offload=offload)
        if list_hookpoints:
            typer.echo("\n".join(_list(pipe)))
            return
        from ..activations.collect import parse_keep_steps

        keep = parse_keep_steps(keep_steps)  # names --keep-steps when a value is not an integer
        cfg = CollectConfig(hookpoints=list(hookpoint), steps=steps, guidance=guidance, branches=tuple(branch),
                            keep_steps=keep, tokens_per_record=tokens_per_record, batch_size=batch_size,
                            dtype=store_dtype or dtype_name(dtype, "float16"),
                            height=height, width=width, negative_prompt=negative_prompt, shard_mb=shard_mb,
                            model_id=model, max_sequence_length=max_sequence_length)
        if check_disk and world == 1:
            from ..activations.disk import check_collect_fits, human

            est = check_collect_fits(pipe, ps, out, cfg)
            if est["needed"]:
                typer.echo(f"disk: about {human(est['needed'])} for {est['remaining']:,} prompts "
                           f"({human(est['per_prompt'])} each), {human(est['free'])} free")
        with progress_bar() as p:
            task = p.add_task("collect" if world == 1 else f"collect [{rank}/{world}]", total=None, info="")
            stores = collect(pipe, ps, out, cfg, rank=rank, world_size=world, barrier=barrier,
                             progress=lambda d, n, info: p.update(task, completed=d, total=n, info=info))
    except (PromptFileError, HookpointError, StoreError, ModelLoadError) as e:
        fail(str(e))
    except ValueError as e:  # bad option values reaching the pipeline (branch names, sizes)
        fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    if rank == 0:
        for name, s in stores.items():
            c = s.counts()
            typer.echo(f"{name}: {c['prompts']}/{len(ps)} prompts, {c['records']} records, {c['tokens']} tokens "
                       f"x {s.width} -> {s.dir}")

