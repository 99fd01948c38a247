"""Input checks of the served models: bad input is a clear MlflowException (HTTP 400), never a crash."""

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from clara.serving import MAX_QUESTION_CHARS, check_questions
from flows.models import _questions


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
    assert _questions(pd.DataFrame({"text": ["y" * 50_000]}), column="text") == ["y" * 50_000]
    with pytest.raises(ValueError, match="text 0: 1,000,001 characters"):
        check_questions(["y" * 1_000_001], 1_000_000, "text")
