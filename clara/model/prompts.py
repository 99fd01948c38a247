"""Prompt shapes for the generator: the paper's QA prompt, the SCP QA and paraphrase instructions.

Documents appear in prompts as placeholder runs ``<MEM0>…<MEM{n-1}><SEP>`` whose embeddings are overwritten with
the compressed vectors (``ClaraModel.embed_prompts``), or as raw text for the baseline. ``Prompter`` turns them into
token ids for one tokenizer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

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


class Prompter:
    """Token ids of every prompt a model reads, built with its tokenizer's chat template.

    ``mem_tokens``: the memory placeholder tokens (``<MEM0>…``), as many as a document can have; ``sep_token`` ends
    each document's run.
    """

    def __init__(self, tokenizer, layout: str, mem_tokens: Sequence[str], sep_token: str):
        self.tokenizer = tokenizer
        self.layout = PROMPTS[layout]
        self.mem_tokens = list(mem_tokens)
        self.sep_token = sep_token

    def placeholders(self, n: int) -> str:
        if not 1 <= n <= len(self.mem_tokens):
            raise ValueError(f"a document has 1..{len(self.mem_tokens)} memory tokens at this rate, not {n}")
        return "".join(self.mem_tokens[:n]) + self.sep_token

    def prompt_ids(self, user: str, system: str | None = None) -> list[int]:
        """The chat prompt's token ids. A template without a system role (older Mistral templates raise on one)
        gets the system text folded into the user's turn instead of failing."""
        from jinja2 import TemplateError

        try:
            text = self.tokenizer.apply_chat_template(chat(system, user), tokenize=False, add_generation_prompt=True)
        except TemplateError:
            if not system:
                raise
            text = self.tokenizer.apply_chat_template(chat(None, f"{system}\n{user}"), tokenize=False,
                                                      add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def qa_prompt(self, question: str, n_per_doc: Sequence[int]) -> list[int]:
        """The QA prompt over compressed documents with ``n_per_doc`` memory vectors each."""
        docs = "".join(self.placeholders(n) for n in n_per_doc)
        return self.prompt_ids(QA_USER.format(documents=docs, question=question), QA_SYSTEM)

    def text_qa_prompt(self, question: str, documents: Sequence[str]) -> list[int]:
        """The raw-text baseline's prompt: the QA prompt with the documents as text (none: closed book)."""
        if documents:
            background = "\n".join(f"Document {i + 1}: {d}" for i, d in enumerate(documents))
            user = QA_USER.replace("{documents}", background).replace("{question}", question)
        else:  # closed book: the same instruction, no background at all
            user = f"Question:{question}"
        return self.prompt_ids(user, QA_SYSTEM)

    def paraphrase_prompt(self, n_mem: int) -> list[int]:
        """The first reconstruction instruction over one compressed document of ``n_mem`` vectors."""
        return self.prompt_ids(self.layout.paraphrase_users[0].format(documents=self.placeholders(n_mem)),
                               self.layout.paraphrase_system)

    def target_ids(self, text: str, max_len: int) -> list[int]:
        """Response tokens followed by EOS, so the generator learns to stop; a target longer than ``max_len``
        is cut and gets no EOS, since stopping mid-line is not what it should learn."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_len:
            return ids[:max_len]
        return ids + [self.tokenizer.eos_token_id]

    def fixed_prefixes(self) -> set[tuple[int, ...]]:
        """What every QA and every paraphrase prompt starts with, whatever its user turn says (``PrefixCache``)."""
        systems = (QA_SYSTEM, self.layout.paraphrase_system)
        return {tuple(os.path.commonprefix([self.prompt_ids("A", s), self.prompt_ids("B", s)])) for s in systems}
