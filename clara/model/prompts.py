"""Prompt shapes for the generator: the paper's QA prompt, the SCP QA and paraphrase instructions.

Documents appear in prompts as placeholder runs ``<MEM0>…<MEM{n-1}><SEP>`` whose embeddings are overwritten with
the compressed vectors (``ClaraModel.embed_prompt``), or as raw text for the baseline.
"""

from __future__ import annotations

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


def qa_lines(questions: list[str], answers: list[str]) -> str:
    """The SCP QA target: one "Question: …\\nAnswer: …" block per pair."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    return "\n".join(f"Question: {q.strip()}\nAnswer: {a.strip()}" for q, a in zip(questions, answers))


def chat(system: str | None, user: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    return messages
