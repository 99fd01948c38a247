"""Prompt shapes for the generator: the paper's QA prompt, the SCP QA and paraphrase instructions.

Documents appear in prompts as placeholder runs ``<MEM0>…<MEM{n-1}><SEP>`` whose embeddings are overwritten with
the compressed vectors (``ClaraModel.embed_prompt``), or as raw text for the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

QA_SYSTEM = (
    "You are a helpful assistant. Your task is to extract relevant information from provided documents and to "
    "answer to questions as briefly as possible."
)
QA_USER = "Background:\n{documents}\n\nQuestion:{question}"

# SCP QA: the generator must produce every "Question/Answer" line of the document from its memory alone.
SCP_QA_USER = "Background:\n{documents}\n\nList the questions this background answers, each with its answer."

# Several phrasings of "reconstruct this document", as PISCO/CLaRa do, so the generator does not latch onto one.
PARAPHRASE_USER = (
    "Background:\n{documents} means the same as",
    "Background:\n{documents}\n\nCan you put the above text in other words?",
    "Background:\n{documents}\n\nPlease provide a reworded version of the text above.",
    "Background:\n{documents}\n\nRewrite the document above in different words, keeping every fact.",
    "Background:\n{documents}\n\nWhat is a paraphrase of the text above?",
)


# The authors' own prompts (apple/ml-clara), for checkpoints imported from their release: a model sees exactly the
# prompts it was trained on. Their SCP and paraphrase prompts carry a system message; QA is the same as ours.
ML_CLARA_SCP_QA_SYSTEM = (
    "You are a helpful assistant. Given a document, your task is to generate some single questions to cover all "
    "key information of the document and answer them sequentially."
)
ML_CLARA_SCP_QA_USER = "Background:\n{documents}"
ML_CLARA_PARAPHRASE_SYSTEM = (
    "You are a helpful assistant. Your task is follow the instructions to paraphrase the background information."
)
ML_CLARA_PARAPHRASE_USER = (
    "Background: {documents} means the same as",
    "Background: {documents} Can you put the above sentences in your own terms?",
    "Background: {documents} Please provide a reinterpretation of the preceding background text.",
    "These two expressions are equivalent in essence:\n(1) {documents}\n(2)",
    "Background: {documents} is a paraphrase of what?",
    "Background: {documents} Could you give me a different version of the background sentences above?",
    "In other words, background: {documents} is just another way of saying:",
    "You're getting across the same point whether you say background: {documents} or",
    "Background: {documents} After unpacking the ideas in the background information above, we got:",
    "Background: {documents} Please offer a restatement of the background sentences I've just read.",
    "Background: {documents}, which also means:",
    "Strip away the mystery, and you'll find background: {documents} is simply another rendition of:",
    "The essence of background: {documents} is captured again in the following statement:",
)


@dataclass(frozen=True)
class PromptSet:
    """The stage-1 prompts of one input layout (``ModelConfig.layout``); QA prompts are shared."""

    scp_qa_user: str
    scp_qa_system: str | None
    paraphrase_users: tuple[str, ...]
    paraphrase_system: str | None


PROMPTS = {
    "clara": PromptSet(SCP_QA_USER, None, PARAPHRASE_USER, None),
    "ml-clara": PromptSet(ML_CLARA_SCP_QA_USER, ML_CLARA_SCP_QA_SYSTEM, ML_CLARA_PARAPHRASE_USER,
                          ML_CLARA_PARAPHRASE_SYSTEM),
}


def qa_lines(questions: list[str], answers: list[str]) -> str:
    """The SCP QA target: one "Question: …\\nAnswer: …" block per pair."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    return "\n".join(f"Question: {q.strip()}\nAnswer: {a.strip()}" for q, a in zip(questions, answers))


def chat(system: str | None, user: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    return messages
