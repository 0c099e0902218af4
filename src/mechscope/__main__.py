"""``python -m mechscope ...`` runs the CLI (also under ``torchrun -m mechscope``)."""

import sys

from .cli import main

sys.exit(main())
