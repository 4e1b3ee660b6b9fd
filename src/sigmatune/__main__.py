"""`python -m sigmatune ...` is the `sigmatune` command."""

import sys

from .cli import main

sys.exit(main())
