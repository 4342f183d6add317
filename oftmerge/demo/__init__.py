"""Tiny tasks, evaluation and training helpers for the OFT-merge demo (no merging code here)."""
