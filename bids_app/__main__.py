"""``python -m bids_app`` runs the ``mninorm`` command."""

import sys

from bids_app.cli import main

if __name__ == "__main__":
    sys.exit(main())
