"""Groma's multi-level RoIAlign region encoder (pure PyTorch)."""
