"""Test helpers for groma-core and for plugin authors (the contract test kit lives in :mod:`.contract`)."""
