"""Groma's DINOv2 image tokenizer (DINOv2-L/14 at 448 px, 2x2 token merge)."""
