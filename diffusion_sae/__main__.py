"""`python -m diffusion_sae ...`, the same as the `diffusion-sae` script."""
from .cli import main

main()
