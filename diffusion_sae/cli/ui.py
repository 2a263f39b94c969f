"""`diffusion-sae ui` and `dashboard export`: the Gradio UI and static feature dashboards."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import DEVICE_OPT, DTYPE_OPT, OFFLOAD_OPT, SHAPES, fail, load_model, progress_bar, prompt_set


def _ui_engine(model: str, text_sae: Optional[Path], block_sae: Optional[Path], stats_prompts: Optional[Path],
               per_concept: int, stats_steps: int, device=None, dtype=None, offload=None):
    from ..app.engine import Engine
    from ..app.shapescanvas import default_prompts, sae_folders
    from ..sae import SAEError

    if stats_steps <= 0:
        fail(f"--stats-steps must be a positive number of denoising steps, got {stats_steps}")
    if per_concept <= 0:
        fail(f"--per-concept must be a positive number of prompts, got {per_concept}")
    if model not in (None, "", SHAPES) and block_sae is None:
        fail("give --block-sae FOLDER (its concept dictionaries are read from the same folder) for a model "
             "other than the bundled one")
    if stats_prompts is not None:
        ps = prompt_set(stats_prompts, None, 0)
        prompts, seeds = [r.prompt for r in ps.rows], [r.seed for r in ps.rows]
    else:
        prompts, seeds = default_prompts(per_concept)
    pipe = load_model(model, device, dtype, offload)
    try:
        return Engine.from_folders(pipe, *sae_folders(block_sae, text_sae),
                                   model_dir=Path(model) if model and model != SHAPES else None,
                                   stats_prompts=prompts, stats_seeds=seeds, stats_steps=stats_steps)
    except (SAEError, FileNotFoundError, OSError, ValueError) as e:
        fail(str(e).splitlines()[0])


def ui_cmd(model: str = typer.Option(SHAPES, help="Pipeline folder, hub id or shapescanvas."),
           text_sae: Optional[Path] = typer.Option(None, help="Text-encoder SAE folder (default: bundled)."),
           block_sae: Optional[Path] = typer.Option(None, help="Block SAE folder with its concept dictionaries (default: bundled)."),
           host: str = typer.Option("127.0.0.1", help="Interface to bind (localhost only by default)."),
           port: int = 7860,
           stats_prompts: Optional[Path] = typer.Option(None, help="Prompt file for the feature explorer (default: ShapesCanvas concept prompts)."),
           per_concept: int = typer.Option(4, help="Default explorer prompts per concept."),
           stats_steps: int = typer.Option(25, help="Denoising steps of the explorer's prompt set."),
           device: str = DEVICE_OPT, dtype: str = DTYPE_OPT, offload: str = OFFLOAD_OPT):
    """Web UI: steer / erase concepts with sliders, explore block-SAE features (Gradio)."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        fail('the web UI needs gradio: pip install "diffusion-sae[ui]"')
    from ..app.ui import launch

    if not 1 <= port <= 65535:
        fail(f"--port must lie in 1..65535, got {port}")
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            fail(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e}); another program may use it, "
                 "give another --port")
    engine = _ui_engine(model, text_sae, block_sae, stats_prompts, per_concept, stats_steps, device, dtype, offload)
    typer.echo(f"serving on http://{host}:{port} (Ctrl-C stops)")
    launch(engine, host=host, port=port, block=True)


dashboard_app = typer.Typer(no_args_is_help=True, help="Static feature dashboards (self-contained HTML).")


@dashboard_app.command("export")
def dashboard_export_cmd(out: Path = typer.Option(..., help="Folder to write (a previous export there is replaced; any other non-empty folder is refused)."),
                         features: Optional[str] = typer.Option(None, help="Comma-separated feature indices (default: the strongest)."),
                         n_features: int = typer.Option(16, help="How many features when --features is not given."),
                         model: str = typer.Option(SHAPES), text_sae: Optional[Path] = None,
                         block_sae: Optional[Path] = None, stats_prompts: Optional[Path] = None,
                         per_concept: int = 8, stats_steps: int = 25,
                         device: str = DEVICE_OPT, dtype: str = DTYPE_OPT, offload: str = OFFLOAD_OPT):
    """Write a feature dashboard folder (index.html + one page per feature) that opens offline."""
    from ..app.export import check_target, export_dashboard
    from ..concepts.features import FeatureError

    try:
        feats = [int(x) for x in features.split(",") if x.strip()] if features else None
    except ValueError:
        fail(f"--features must be comma-separated integers, got {features!r}")
    if n_features <= 0:
        fail(f"--n-features must be a positive number of features, got {n_features}")
    check_target(out)  # before the feature statistics: refuse a folder that is not a previous export
    engine = _ui_engine(model, text_sae, block_sae, stats_prompts, per_concept, stats_steps, device, dtype, offload)
    with progress_bar() as p:
        task = p.add_task("feature stats", total=len(engine.stats_prompts), info="")
        stats = engine.stats(progress=lambda i, n: p.update(task, completed=i))
    try:
        index = export_dashboard(out, stats, engine.index() if engine.dictionaries else None, feats, n_features)
    except (FeatureError, ValueError) as e:
        fail(str(e))
    typer.echo(f"dashboard: {index}")

