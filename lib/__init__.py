"""Intervention workflows on language models with nnsight (see README.md)."""
