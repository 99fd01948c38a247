"""The MLflow ``pyfunc`` models the registry holds: ``ClaraQAModel`` (questions in, answers from the pgvector
store out; ``clara.serving.Answerer`` inside) and ``CompressorModel`` (documents in, memory tokens out).

The registered QA model records *which* build it answers from (``build_id``); the database is found at load time
(``$CLARA_DATABASE_URL``, else the embedded server on this machine), so no credentials travel with a model.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc

from clara.serving import Answerer


def _questions(model_input: Any, column: str = "question", max_chars: int | None = None) -> list[str]:
    """Accept what ``mlflow models serve`` and ``predict`` hand over: a DataFrame, dicts, strings.

    Bad input raises ``MlflowException(INVALID_PARAMETER_VALUE)``: the scoring server answers it with HTTP 400 and
    this message (any other exception becomes a generic "unexpected error" with a stack trace). Values longer than
    ``max_chars`` (default: ``clara.serving.MAX_QUESTION_CHARS``) are refused.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    from clara.serving import MAX_QUESTION_CHARS, check_questions

    try:
        if hasattr(model_input, "columns"):
            if column not in model_input.columns:
                raise ValueError(f"input needs a {column!r} column; got {list(model_input.columns)}")
            values = model_input[column].tolist()
        elif isinstance(model_input, dict):
            if column not in model_input:
                raise ValueError(f"input needs a {column!r} field; got {sorted(model_input)}")
            value = model_input[column]
            values = value if isinstance(value, list) else [value]
        elif isinstance(model_input, str):
            values = [model_input]
        else:
            values = [x.get(column) if isinstance(x, dict) else x for x in model_input]
        if not values:
            raise ValueError("no questions in the input")
        return check_questions(values, max_chars or MAX_QUESTION_CHARS, column)
    except ValueError as e:
        raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None


def _merge(configured: bool) -> bool:
    """Whether to serve from merged copies (more copies of the base, for base speed): ``$CLARA_MERGE`` (``0``
    or ``1``; ``mlflow models serve`` takes no model config), else the model config's ``merge``."""
    import os

    env = os.environ.get("CLARA_MERGE")
    if env is not None:
        if env not in ("0", "1"):
            raise ValueError(f"CLARA_MERGE must be 0 or 1, got {env!r}")
        return env == "1"
    return configured


class ClaraQAModel(mlflow.pyfunc.PythonModel):
    """Questions in (column ``question``), answers out with the retrieved documents and their scores.

    Concurrent requests (``mlflow models serve`` runs each in its own thread) are answered in shared batches
    (``clara.serving.Batcher``, at most ``max_batch`` questions, model config), one model call at a time."""

    def load_context(self, context) -> None:
        import os

        from clara.serving import Batcher

        cfg = dict(context.model_config or {})
        self.answerer = Answerer.load(context.artifacts["checkpoint"], int(cfg["build_id"]),
                                      database_url=os.environ.get("CLARA_DATABASE_URL") or cfg.get("database_url"),
                                      device=cfg.get("device"), k=int(cfg.get("k", 5)),
                                      # versions registered before the first-stage modes searched with CLaRa alone
                                      mode=str(cfg.get("mode", "clara")), fuse=float(cfg.get("fuse", 0.0)),
                                      candidates=int(cfg["candidates"]) if cfg.get("candidates") else None,
                                      # versions registered before the re-rank became conditional always re-ranked
                                      rerank=str(cfg.get("rerank", "always")),
                                      max_new_tokens=int(cfg.get("max_new_tokens", 64)),
                                      merge=_merge(bool(cfg.get("merge", True))))
        self.batcher = Batcher(self._answer, max_batch=int(cfg.get("max_batch", 8)))

    def _answer(self, items: list[tuple[str, int | None]]) -> list:
        """Answer (question, k) pairs: one ``ask`` per distinct k, results in the order given."""
        out: list = [None] * len(items)
        for k in dict.fromkeys(k for _, k in items):
            idx = [i for i, (_, kk) in enumerate(items) if kk == k]
            for i, a in zip(idx, self.answerer.ask([items[i][0] for i in idx], k=k)):
                out[i] = a
        return out

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

        from clara.store.builds import StoreUnavailable

        k = int(params["k"]) if params and params.get("k") else None
        try:
            answers = self.batcher([(q, k) for q in _questions(model_input)])
        except StoreUnavailable as exc:  # the scoring server answers 503 with this message, and keeps serving
            raise MlflowException(str(exc), error_code=TEMPORARILY_UNAVAILABLE) from None
        return pd.DataFrame([a.__dict__ for a in answers],
                            columns=["question", "answer", "doc_ids", "titles", "scores"])


class CompressorModel(mlflow.pyfunc.PythonModel):
    """Documents in (column ``text``), memory tokens out: ``n_mem`` and the [n_mem, hidden] tensor as lists."""

    def load_context(self, context) -> None:
        from clara.model.checkpoint import load_checkpoint

        cfg = dict(context.model_config or {})
        self.model = load_checkpoint(context.artifacts["checkpoint"], device=cfg.get("device"))

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        from clara.serving import MAX_DOCUMENT_CHARS

        texts = _questions(model_input, column="text", max_chars=MAX_DOCUMENT_CHARS)
        mems = self.model.compress(texts)
        return pd.DataFrame({"n_mem": [int(m.shape[0]) for m in mems],
                             "memory": [m.float().cpu().numpy().tolist() for m in mems]})
