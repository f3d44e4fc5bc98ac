"""`python -m cpt_tui.cli`."""

import sys

from cpt_tui.cli import main

sys.exit(main())
