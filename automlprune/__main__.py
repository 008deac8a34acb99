"""``python -m automlprune``: the command line (as the ``automlprune`` script)."""

import sys

from automlprune.cli.main import main

sys.exit(main())
