"""Runnable examples (``python examples/segment.py`` or ``python -m examples.segment``)."""
