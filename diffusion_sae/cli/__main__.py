"""`python -m diffusion_sae.cli ...`, the same as the `diffusion-sae` script."""
from . import main

main()
