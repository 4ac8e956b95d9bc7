"""``python -m robustcaps``: the command line (what torchrun's ``-m robustcaps`` runs)."""

from .cli import main

main()
