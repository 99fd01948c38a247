"""Prefect flows over the ``clara`` library (see ``flows/pipeline.py``)."""
