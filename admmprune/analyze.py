"""Command line: ``python -m admmprune.analyze`` (see :mod:`admmprune.app.analyze`).

This file is intentionally short; the analysis is a library
(:mod:`admmprune.app.analyze`) that notebooks call the same way. Its public
names are re-exported here, where users imported them before the code was
organised by layers.
"""

import sys

from admmprune.app.analyze import *  # noqa: F403 - the names users imported from admmprune.analyze
from admmprune.app.analyze import __all__, build_parser, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
