"""The criteria analysis (moved here from ``admmprune/app/analyze.py``; split next)."""

from admmprune.app.analyze._statistics import *  # noqa: F403
from admmprune.app.analyze._statistics import __all__  # noqa: F401
