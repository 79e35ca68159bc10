"""``python -m ssprop_energy`` runs the CLI."""

import sys

from ssprop_energy.cli import main

sys.exit(main())
