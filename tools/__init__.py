"""Development tools of the admmprune repository (not part of the package)."""
