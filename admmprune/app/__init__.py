"""The application (layer L5): the prune pipeline, the pruning methods it runs,
and the analysis of pruning criteria. The command lines
(``python -m admmprune.train | analyze | export``) are thin wrappers of these."""
