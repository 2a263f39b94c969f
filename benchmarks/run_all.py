"""Run every benchmarks/*.py script (except this one) in turn with the current interpreter.

Scripts that compare against peer libraries (sae_train.py) run with BENCH_PYTHON instead when it
names an interpreter (`make bench` points it at .bench-venv/bin/python, built by `make bench-venv`);
otherwise with the current one, and their peer rows say why a peer is missing.
"""
import os
import subprocess
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
PEER_SCRIPTS = {"sae_train.py"}
bench_python = os.environ.get("BENCH_PYTHON", "")
if bench_python and not os.access(bench_python, os.X_OK):
    print(f"note: BENCH_PYTHON={bench_python} is not an executable; peer benchmarks use {sys.executable}")
    bench_python = ""
failed = []
for script in sorted(here.glob("*.py")):
    if script.name == Path(__file__).name or script.name.startswith("_"):
        continue
    python = bench_python if bench_python and script.name in PEER_SCRIPTS else sys.executable
    print(f"=== {script.name} ({python}) ===", flush=True)
    if subprocess.run([python, str(script)]).returncode != 0:
        failed.append(script.name)
if failed:
    print("failed:", ", ".join(failed))
    sys.exit(1)
