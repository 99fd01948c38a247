"""The serving library: input checks and the request batcher."""

import pytest

from clara.serving import MAX_QUESTION_CHARS, check_questions


@pytest.mark.parametrize("bad, message", [
    (["a?", 7], "question 1: expected a string, got int"),
    ([" "], "question 0: empty question"),
    (["x" * (MAX_QUESTION_CHARS + 1)], "question 0: 2,001 characters; at most 2,000"),
])
def test_each_bad_question_is_named_by_its_position(bad, message):
    with pytest.raises(ValueError, match=message):
        check_questions(bad)


def test_the_limit_and_the_word_are_the_callers():
    assert check_questions(["y" * 50], 50, "text") == ["y" * 50]
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
