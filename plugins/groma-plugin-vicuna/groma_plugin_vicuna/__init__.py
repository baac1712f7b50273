"""Groma's Vicuna / LLaMA language backbone with the 114 new tokens."""
