"""Command line: ``python -m admmprune.export`` (see :mod:`admmprune.runtime.export`).

This file is intentionally short; the export is a library function
(:func:`admmprune.runtime.export.export_forward`), re-exported here where
users imported it before the code was organised by layers.
"""

import sys

from admmprune.runtime.export import *  # noqa: F403 - the names users imported from admmprune.export
from admmprune.runtime.export import __all__, build_parser, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
