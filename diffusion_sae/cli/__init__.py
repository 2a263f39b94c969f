"""`diffusion-sae` command line: a thin shell over the Python API.

Each module here parses one command group's options, checks them, calls the library and prints; this file
builds the command tree and turns every `DiffusionSAEError` into one `error: ...` line with exit code 2.
Heavy imports (torch, diffusers) happen inside commands so that `--help` stays fast.
"""
from __future__ import annotations

import os
import sys

import typer

from ..errors import DiffusionSAEError
from . import benchmark, collect, concepts, evaluate, intervene, reproduce, steer, train, ui, unlearn, world
from .common import UserError, fail

__all__ = ["app", "main", "UserError", "fail"]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Sparse autoencoders for text-to-image diffusion: train, find concepts, steer, unlearn, evaluate.")

# The command tree, in the order `--help` lists it.
app.add_typer(world.world_app, name="world")
app.command("collect")(collect.collect_cmd)
app.command("train-sae")(train.train_sae_cmd)
app.command("train-text-sae")(train.train_text_sae_cmd)
app.command("train-block-sae")(train.train_block_sae_cmd)
app.add_typer(concepts.concepts_app, name="concepts")
app.command("steer")(steer.steer_cmd)
app.command("unlearn")(unlearn.unlearn_cmd)
app.command("intervene")(intervene.intervene_cmd)
evaluate.eval_app.command("attack")(benchmark.eval_attack)
evaluate.eval_app.command("shapes")(benchmark.eval_shapes)
app.add_typer(evaluate.eval_app, name="eval")
app.add_typer(reproduce.reproduce_app, name="reproduce")
app.command("tune")(benchmark.tune_cmd)
app.command("demo")(benchmark.demo_cmd)
app.command("ui")(ui.ui_cmd)
app.add_typer(ui.dashboard_app, name="dashboard")


def _quiet_libraries() -> None:
    """Only errors from transformers / diffusers reach stderr: their advice about optional backends
    (torchvision missing, component types) is not the user's concern and buried the one-line error.
    TRANSFORMERS_VERBOSITY / DIFFUSERS_VERBOSITY set by the user win."""
    for env, mod in (("TRANSFORMERS_VERBOSITY", "transformers"), ("DIFFUSERS_VERBOSITY", "diffusers")):
        if env in os.environ:
            continue
        os.environ[env] = "error"
        if mod in sys.modules:  # imported already (in-process callers): the variable came too late
            try:
                sys.modules[mod].logging.set_verbosity_error()
            except AttributeError:
                pass


def main() -> None:
    _quiet_libraries()
    try:
        app()
    except DiffusionSAEError as e:
        # One line: the message may carry newlines (and terminal colour codes) from a library below us.
        import re

        typer.echo("error: " + " ".join(re.sub(r"\x1b\[[0-9;?]*[ -/]*[@-~]", "", str(e)).split()), err=True)
        sys.exit(2)


