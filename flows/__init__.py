"""Prefect flows over the ``clara`` library (see ``flows/pipeline.py``)."""

from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
"""The checkout this package runs from (its default project folder: DVC data, the wheel's sources)."""
