"""Run `diffusion-sae ARGS` in-process through `cli.main` (exit code, stdout, stripped stderr)."""
import sys


def run_main(args, capsys):
    from diffusion_sae import cli

    old, sys.argv = sys.argv, ["diffusion-sae", *map(str, args)]
    try:
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code or 0
    finally:
        sys.argv = old
    cap = capsys.readouterr()
    return code, cap.out, cap.err.strip()
