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
