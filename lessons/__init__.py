"""Numbered, runnable lessons. `python -m lessons` runs them all in order."""
