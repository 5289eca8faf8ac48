"""`python -m salmae` (and `torchrun -m salmae`): the `salmae` command line."""

from salmae.pipeline.cli import main

main()
