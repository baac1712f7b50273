"""Groma's two-stage class-agnostic Deformable DETR region proposer."""
