"""Input checks of the served models: bad input is a clear MlflowException (HTTP 400), never a crash."""

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from clara.serving import MAX_QUESTION_CHARS, check_questions
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
    with pytest.raises(ValueError, match="text 0: 1,000,001 characters"):
        check_questions(["y" * 1_000_001], 1_000_000, "text")


def test_batcher_answers_concurrent_callers_together_and_in_order():
    import threading
    import time

    from clara.serving import Batcher

    calls = []

    def slow_double(xs):
        calls.append(list(xs))
        time.sleep(0.05)  # a model call: others arrive meanwhile
        return [2 * x for x in xs]

    b = Batcher(slow_double, max_batch=8)
    results = {}

    def client(i):
        results[i] = b([i, 100 + i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: [2 * i, 200 + 2 * i] for i in range(12)}
    assert sum(b.batches) == 24 and max(b.batches) <= 8 and len(b.batches) < 12  # shared calls, none too big


def test_one_bad_request_does_not_fail_the_others_in_its_batch():
    import threading
    import time

    from clara.serving import Batcher

    def picky(xs):
        time.sleep(0.05)
        if any(x < 0 for x in xs):
            raise ValueError("negative")
        return xs

    b = Batcher(picky, max_batch=8)
    out = {}

    def client(i):
        try:
            out[i] = b([-1 if i == 3 else i])
        except ValueError as e:
            out[i] = str(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == {0: [0], 1: [1], 2: [2], 3: "negative", 4: [4], 5: [5]}
    assert max(b.batches) > 1  # the bad request did share a batch, and the others were answered anyway
    b2 = Batcher(picky)
    with pytest.raises(ValueError, match="negative"):
        b2([-1])
    assert b2([1, 2]) == [1, 2]


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
