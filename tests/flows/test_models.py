"""Input checks of the served MLflow model (``clara_flows.models``): bad input is a clear MlflowException (HTTP 400),
a store outage a 503; never a crash."""

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from clara.serving import MAX_QUESTION_CHARS
from clara_flows.models import _questions


def test_questions_are_taken_from_every_input_shape():
    assert _questions(pd.DataFrame({"question": ["a?", "b?"]})) == ["a?", "b?"]
    assert _questions({"question": ["a?"]}) == ["a?"] and _questions({"question": "a?"}) == ["a?"]
    assert _questions("a?") == ["a?"] and _questions([{"question": "a?"}, "b?"]) == ["a?", "b?"]


@pytest.mark.parametrize("bad, message", [
    (pd.DataFrame({"query": ["a?"]}), "needs a 'question' column"),
    ({"text": "a?"}, "needs a 'question' field"),
    (pd.DataFrame({"question": ["a?", 7]}), "question 1: expected a string, got int"),
    (pd.DataFrame({"question": ["x" * (MAX_QUESTION_CHARS + 1)]}), "question 0: 2,001 characters"),
    ([{"question": " "}], "question 0: empty question"),
    (pd.DataFrame({"question": []}), "no questions"),
])
def test_bad_input_is_a_bad_request_that_names_the_problem(bad, message):
    with pytest.raises(MlflowException, match=message) as e:
        _questions(bad)
    assert e.value.get_http_status_code() == 400


def test_documents_may_be_long_but_not_unbounded():
    from clara.serving import MAX_DOCUMENT_CHARS

    long = pd.DataFrame({"text": ["y" * 50_000]})
    assert _questions(long, column="text", max_chars=MAX_DOCUMENT_CHARS) == ["y" * 50_000]
    with pytest.raises(MlflowException, match="text 0: 50,000 characters; at most 2,000"):
        _questions(long, column="text")  # the question limit unless the caller says otherwise


def test_a_store_outage_is_a_503_that_says_how_to_recover():
    """What the scoring server gets when the database does not answer: 503 with the store's message (the
    outage itself, against a real server, is tested in tests/library/store)."""
    from clara.store.builds import StoreUnavailable
    from clara_flows.models import ClaraQAModel

    def down(items):
        raise StoreUnavailable("cannot reach the database at postgresql://x: it did not answer (connection refused); "
                               "start it (python -m clara_infra.services up)")

    model = ClaraQAModel()
    model.batcher = down
    with pytest.raises(MlflowException) as err:
        model.predict(None, pd.DataFrame({"question": ["Where?"]}))
    assert err.value.get_http_status_code() == 503 and "clara_infra.services up" in err.value.message


def test_the_served_model_answers_503_while_its_database_is_down_then_answers_again(tiny_model, docs, own_server,
                                                                                     tmp_path):
    """End to end over HTTP: ``mlflow models serve`` of a QA model whose build lives on a real Postgres of this test's
    own. The server is stopped under it: the request gets a 503 whose message names the database and how to restart
    it; started again, the same scoring process (no restart, no reload) answers as before."""
    import httpx
    import mlflow.pyfunc

    from clara.data.corpus import Document
    from clara.model.checkpoint import save_checkpoint
    from clara.store.loading import index_corpus
    from clara_flows.registry import MODEL_CODE, model_signature
    from conftest import scoring_server

    corpus = [Document(f"d{i}", f"Doc {i}", t) for i, t in enumerate(docs)]
    build = index_corpus(own_server.engine, tiny_model, corpus, model_uri="m-http-outage", corpus_version="outage",
                         progress=False)
    ckpt = save_checkpoint(tiny_model, tmp_path / "ckpt")
    mlflow.pyfunc.save_model(tmp_path / "model", python_model=str(MODEL_CODE["qa"]),
                             artifacts={"checkpoint": str(ckpt)}, signature=model_signature("qa", "question"),
                             model_config={"build_id": build.id, "k": 2, "mode": "clara", "max_new_tokens": 2})
    log = tmp_path / "serve.log"
    ask = {"dataframe_records": [{"question": "Which river flows through Paris?"}]}
    with scoring_server(str(tmp_path / "model"), log, {"CLARA_DATABASE_URL": own_server.url}) as (url, proc):
        before = httpx.post(f"{url}/invocations", json=ask, timeout=60)
        assert before.status_code == 200, (before.text, log.read_text()[-2000:])
        own_server.stop()
        try:
            down = httpx.post(f"{url}/invocations", json=ask, timeout=60)
        finally:
            own_server.start()
        assert down.status_code == 503, down.text[:1000]
        message = down.json()["message"]
        assert "did not answer" in message and "python -m clara_infra.services up" in message, message
        assert "Traceback" not in message
        after = httpx.post(f"{url}/invocations", json=ask, timeout=60)
        assert after.status_code == 200, after.text[:1000]
        assert after.json()["predictions"] == before.json()["predictions"] and proc.poll() is None
