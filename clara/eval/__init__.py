"""Evaluation: metrics (pure), retrievers and baselines, and the evaluation run that writes the report."""
