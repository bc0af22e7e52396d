"""Configs shipped with admmprune, selectable by name: ``--config smoke``.

Each module has ``get_config()`` returning an ``ml_collections.ConfigDict``;
``default`` documents every field, and the others import it and override a
few. The repository's top-level ``configs/`` points here.
"""
