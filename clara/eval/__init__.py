"""Evaluation: metrics (pure), the promotion gate, answer likelihoods, and the evaluation run that writes the report
(its retrievers are `clara.retrieval`'s)."""
