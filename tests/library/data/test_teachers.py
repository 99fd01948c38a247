import pytest

from clara.data.corpus import Document
from clara.data.teachers import (
    LLMTeacher,
    OpenAIBackend,
    PromptSet,
    TeacherError,
    grounded,
    parse_answer,
    parse_questions,
    parse_verdict,
)
from fake_openai import FakeOpenAI

DOC = Document("d1", "Einstein", "Albert Einstein was born in Ulm in 1879. He developed the theory of relativity. "
                                  "He received the Nobel Prize in 1921.")


def test_prompt_files_are_versioned_and_filled():
    prompts = PromptSet.load("v1")
    assert prompts.version.startswith("v1+") and len(prompts.version) == 11
    msgs = prompts.messages("answer", title="T", document="has {braces}", question="Why?")
    assert msgs[0]["role"] == "system" and "has {braces}" in msgs[1]["content"] and "Why?" in msgs[1]["content"]
    with pytest.raises(FileNotFoundError):
        PromptSet.load("v999")


def test_parsers():
    reply = "Here you go:\n1. Question: Where was Einstein born?\n- When did he win the prize?\nQ3) where was Einstein born?\nNo question here\n"
    assert parse_questions(reply, 10) == ["Where was Einstein born?", "When did he win the prize?"]
    assert parse_questions(reply, 1) == ["Where was Einstein born?"]
    assert parse_answer("Answer: Ulm.\nextra") == "Ulm"
    assert parse_answer("Unanswerable") is None and parse_answer("  ") is None
    assert parse_verdict("Correct.", "correct", "incorrect")
    assert not parse_verdict("Incorrect", "correct", "incorrect")
    assert not parse_verdict("I think it is incorrect, not correct", "correct", "incorrect")
    assert not parse_verdict("maybe", "yes", "no")
    assert parse_verdict("Yes, it is the same.", "yes", "no")
    assert grounded("the theory of Relativity!", DOC.text)
    assert not grounded("Berlin", DOC.text) and not grounded("", DOC.text)


def test_client_retries_429_500_and_malformed_replies():
    faults = {1: "429", 2: "500", 3: "garbage", 4: "nochoices"}
    with FakeOpenAI(faults) as server:
        backend = OpenAIBackend(server.base_url, "fake", concurrency=1, backoff=0.01, max_retries=5)
        out = backend.complete([[{"role": "user", "content": "Rewritten: x"}]], 8)
        assert out == ["Yes"] and server.requests == 5


def test_client_gives_up_with_a_clear_error():
    with FakeOpenAI(always="503") as server:
        backend = OpenAIBackend(server.base_url, "fake", backoff=0.01, max_retries=2)
        with pytest.raises(TeacherError, match=r"gave up after 3 attempts; last: HTTP 503"):
            backend.complete([[{"role": "user", "content": "hi"}]], 8)
        assert server.requests == 3
    with FakeOpenAI(always="401") as server:
        backend = OpenAIBackend(server.base_url, "fake", backoff=0.01)
        with pytest.raises(TeacherError, match="HTTP 401"):
            backend.complete([[{"role": "user", "content": "hi"}]], 8)
        assert server.requests == 1  # a client error is not retried


def test_client_timeout_and_unreachable_endpoint():
    with FakeOpenAI(always="hang") as server:
        backend = OpenAIBackend(server.base_url, "fake", timeout=0.3, backoff=0.01, max_retries=1)
        with pytest.raises(TeacherError, match="timeout"):
            backend.complete([[{"role": "user", "content": "hi"}]], 8)
    backend = OpenAIBackend("http://127.0.0.1:9/v1", "fake", backoff=0.01, max_retries=1, timeout=1)
    with pytest.raises(TeacherError, match="connection error"):
        backend.complete([[{"role": "user", "content": "hi"}]], 8)


def test_concurrency_is_bounded_and_order_kept():
    with FakeOpenAI(delay=0.05) as server:
        backend = OpenAIBackend(server.base_url, "fake", concurrency=3)
        reqs = [[{"role": "user", "content": f"Document (title: T{i}):\nA b c. D e f.\n\nRewrite this document"}]
                for i in range(9)]
        out = backend.complete(reqs, 16)
        assert server.max_in_flight <= 3 and server.max_in_flight >= 2
        assert out == ["D e f. A b c."] * 9


def test_llm_teacher_over_the_fake_endpoint():
    with FakeOpenAI() as server:
        teacher = LLMTeacher(OpenAIBackend(server.base_url, "fake"))
        props = teacher.propose([DOC], "simple", 8)[0]
        assert len(props) == 3 and all(p.answer is None for p in props)
        answers = teacher.answer([(DOC, p.question) for p in props])
        assert answers == ["Albert Einstein was", "He developed the", "He received the"]
        verdicts = teacher.verify_qa([(DOC, p.question, a) for p, a in zip(props, answers)])
        assert verdicts == [True, False, True]
        assert teacher.propose([DOC], "complex", 4)[0][0].question.startswith("How do the first")
