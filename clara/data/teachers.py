"""Teachers for data synthesis: one interface, three implementations.

- ``LLMTeacher`` over a chat backend — ``OpenAIBackend`` (any OpenAI-compatible endpoint: vLLM, TGI, llama.cpp,
  Ollama, a hosted API) or ``TransformersBackend`` (a local causal LM; default the bundled SmolLM2-135M-Instruct).
  Prompts come from versioned files under ``clara/data/prompts/<version>/``.
- ``NaturalTeacher`` (``clara.data.natural_teacher``): the offline default, spaCy wh-questions people ask.
- ``ExtractiveTeacher`` (``clara.data.extractive_teacher``): the older offline fallback, spaCy cloze questions.

Every teacher proposes questions (with an answer where it already has one), answers, and verifies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol, Sequence

from clara.data.corpus import Document
from clara.errors import ClaraError
from clara.text import answer_tokens, normalize_answer

log = logging.getLogger(__name__)

TASKS = ("system", "simple_qa", "complex_qa", "coverage", "paraphrase", "answer", "verify_qa",
         "verify_paraphrase")


class TeacherError(ClaraError):
    """A teacher could not produce an answer (endpoint down, retries exhausted, bad request)."""


# ----------------------------------------------------------------------------------------------- prompts

@dataclass(frozen=True)
class PromptSet:
    version: str
    """``<folder>+<hash of the files>``: editing a prompt changes the recorded version."""
    templates: dict[str, str]

    @classmethod
    def load(cls, name: str = "v1") -> "PromptSet":
        folder = resources.files("clara.data") / "prompts" / name
        if not folder.is_dir():
            raise FileNotFoundError(f"no prompt set {name!r} under clara/data/prompts/")
        templates = {}
        for task in TASKS:
            file = folder / f"{task}.txt"
            if not file.is_file():
                raise FileNotFoundError(f"prompt set {name!r} lacks {task}.txt")
            templates[task] = file.read_text(encoding="utf-8").strip()
        digest = hashlib.sha256(json.dumps(templates, sort_keys=True).encode()).hexdigest()[:8]
        return cls(f"{name}+{digest}", templates)

    def messages(self, task: str, **fields: str) -> list[dict[str, str]]:
        user = self.templates[task]
        for key, value in fields.items():  # plain replacement: documents may contain braces
            user = user.replace("{" + key + "}", value)
        return [{"role": "system", "content": self.templates["system"]}, {"role": "user", "content": user}]


# ------------------------------------------------------------------------------------------------ parsing

_Q_PREFIX = re.compile(r"^\s*(?:[-*•]|\d+[.)]|q\d*[:.)]|question\s*\d*\s*[:.)])\s*", re.IGNORECASE)


def parse_questions(text: str, limit: int) -> list[str]:
    """Questions from a teacher's reply: one per line, numbering/bullets/"Question:" stripped, must end in '?'."""
    out, seen = [], set()
    for line in text.splitlines():
        line = _Q_PREFIX.sub("", line.strip()).strip()
        line = re.sub(r"^question\s*:\s*", "", line, flags=re.IGNORECASE)
        if "?" not in line:
            continue
        q = line[: line.index("?") + 1].strip()
        key = normalize_answer(q)
        if len(q) < 8 or key in seen:
            continue
        seen.add(key)
        out.append(q)
        if len(out) >= limit:
            break
    return out


def parse_answer(text: str) -> str | None:
    """First line of the reply without an "Answer:" prefix; None when the teacher says it cannot answer."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return None
    ans = re.sub(r"^answer\s*:\s*", "", lines[0], flags=re.IGNORECASE).strip().strip('"').rstrip(".").strip()
    if not ans or "unanswerable" in ans.lower() or len(ans) > 200:
        return None
    return ans


def parse_verdict(text: str, yes: str, no: str) -> bool:
    """True only if the reply's first verdict word is ``yes`` (``Incorrect`` is checked before ``Correct``)."""
    low = text.lower()
    pos_no = low.find(no.lower())
    pos_yes = re.search(rf"\b{re.escape(yes.lower())}\b", low)
    if pos_yes is None:
        return False
    return pos_no == -1 or pos_yes.start() < pos_no


def grounded(answer: str, document: str) -> bool:
    """Every token of the normalised answer occurs in the normalised document."""
    tokens = answer_tokens(answer)
    doc = set(answer_tokens(document))
    return bool(tokens) and all(t in doc for t in tokens)


# ----------------------------------------------------------------------------------------------- backends

class ChatBackend(Protocol):
    name: str

    def complete(self, requests: Sequence[list[dict[str, str]]], max_tokens: int) -> list[str]:
        """One reply per request, in order; raises TeacherError when a request cannot be served."""


class OpenAIBackend:
    """Any OpenAI-compatible ``/chat/completions`` endpoint, with bounded concurrency, retries with backoff on
    429/5xx/timeouts/malformed replies, and a per-request timeout."""

    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 4,
                 max_retries: int = 5, timeout: float = 60.0, backoff: float = 0.5, max_backoff: float = 20.0,
                 temperature: float = 0.0):
        import httpx

        self.name = f"openai:{model}"
        self.model = model
        self.concurrency = max(1, concurrency)
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.temperature = temperature
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(api_key_env, "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.client = httpx.Client(timeout=timeout, headers=headers)
        self._rng = random.Random(0)

    def _one(self, messages: list[dict[str, str]], max_tokens: int) -> str:
        import httpx

        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                "temperature": self.temperature}
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * (0.5 + self._rng.random())
                time.sleep(delay)
            try:
                resp = self.client.post(self.url, json=body)
            except httpx.TimeoutException as exc:
                last = f"timeout ({exc.__class__.__name__})"
                continue
            except httpx.TransportError as exc:
                last = f"connection error: {exc}"
                continue
            if resp.status_code in self.RETRY_STATUS:
                last = f"HTTP {resp.status_code}"
                retry_after = resp.headers.get("retry-after")
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    time.sleep(min(self.max_backoff, float(retry_after)))
                continue
            if resp.status_code >= 400:
                raise TeacherError(f"{self.url}: HTTP {resp.status_code}: {resp.text[:300]}")
            try:
                content = resp.json()["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise TypeError("content is not a string")
                return content
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                last = f"malformed reply ({exc.__class__.__name__}: {str(exc)[:80]}): {resp.text[:120]!r}"
                continue
        raise TeacherError(f"{self.url}: gave up after {self.max_retries + 1} attempts; last: {last}")

    def complete(self, requests: Sequence[list[dict[str, str]]], max_tokens: int) -> list[str]:
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(lambda m: self._one(m, max_tokens), requests))


class TransformersBackend:
    """A local causal LM (``tiny``, ``smollm2-135m`` or a path) with its chat template, greedy and batched."""

    def __init__(self, model: str = "smollm2-135m", *, device: str = "auto", batch_size: int = 8,
                 max_prompt_tokens: int = 768):
        from clara.model.base import load_base, resolve_device, resolve_dtype

        dev = resolve_device(device)
        self.lm, self.tokenizer = load_base(model, device=dev, dtype=resolve_dtype("auto", dev))
        self.name = f"transformers:{model}"
        self.batch_size = batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.device = dev

    def complete(self, requests: Sequence[list[dict[str, str]]], max_tokens: int) -> list[str]:
        import torch

        from clara.model.decoding import greedy_decode

        out: list[str] = [""] * len(requests)
        rows = []
        for messages in requests:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            rows.append(ids[-self.max_prompt_tokens :])
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        embed = self.lm.get_input_embeddings()
        pad = self.tokenizer.pad_token_id
        for s in range(0, len(order), self.batch_size):
            chunk = order[s : s + self.batch_size]
            width = max(len(rows[i]) for i in chunk)
            ids = torch.tensor([[pad] * (width - len(rows[i])) + rows[i] for i in chunk], device=self.device)
            mask = torch.tensor([[0] * (width - len(rows[i])) + [1] * len(rows[i]) for i in chunk],
                                device=self.device)
            produced = greedy_decode(self.lm, embed, embed(ids), mask, max_tokens, [self.tokenizer.eos_token_id])
            for i, toks in zip(chunk, produced):
                out[i] = self.tokenizer.decode(toks, skip_special_tokens=True).strip()
        return out


# ----------------------------------------------------------------------------------------------- teachers

@dataclass
class Proposal:
    question: str
    answer: str | None = None
    """Set when the teacher derives the question from a known answer (extractive)."""


class Teacher(Protocol):
    name: str
    prompt_version: str
    qa_check: str
    """How kept pairs were verified (recorded with every row)."""
    paraphrase_check: str

    def propose(self, docs: Sequence[Document], kind: str, limit: int) -> list[list[Proposal]]: ...
    def cover(self, docs: Sequence[Document], missing: Sequence[list[str]], limit: int) -> list[list[Proposal]]: ...
    def answer(self, items: Sequence[tuple[Document, str]]) -> list[str | None]: ...
    def verify_qa(self, items: Sequence[tuple[Document, str, str]]) -> list[bool]: ...
    def paraphrase(self, docs: Sequence[Document]) -> list[str]: ...
    def verify_paraphrase(self, items: Sequence[tuple[Document, str]]) -> list[bool]: ...


class LLMTeacher:
    """The five tasks as prompts to a chat backend."""

    def __init__(self, backend: ChatBackend, prompts: PromptSet | None = None, *, qa_tokens: int = 256,
                 answer_tokens: int = 32, paraphrase_tokens: int = 320):
        self.backend = backend
        self.prompts = prompts or PromptSet.load()
        self.name = backend.name
        self.prompt_version = self.prompts.version
        self.qa_check = "teacher-correct+grounded"
        self.paraphrase_check = "teacher-faithful"
        self.qa_tokens, self.answer_tokens, self.paraphrase_tokens = qa_tokens, answer_tokens, paraphrase_tokens

    def _ask(self, task: str, fields: Sequence[dict[str, str]], max_tokens: int) -> list[str]:
        return self.backend.complete([self.prompts.messages(task, **f) for f in fields], max_tokens)

    def propose(self, docs, kind, limit):
        task = {"simple": "simple_qa", "complex": "complex_qa"}[kind]
        replies = self._ask(task, [{"title": d.title, "document": d.text, "n": str(limit)} for d in docs],
                            self.qa_tokens)
        return [[Proposal(q) for q in parse_questions(r, limit)] for r in replies]

    def cover(self, docs, missing, limit):
        todo = [i for i, m in enumerate(missing) if m]
        replies = self._ask("coverage", [{"title": docs[i].title, "document": docs[i].text,
                                          "missing": "\n".join(f"- {s}" for s in missing[i][:limit])}
                                         for i in todo], self.qa_tokens)
        out: list[list[Proposal]] = [[] for _ in docs]
        for i, r in zip(todo, replies):
            out[i] = [Proposal(q) for q in parse_questions(r, limit)]
        return out

    def answer(self, items):
        replies = self._ask("answer", [{"title": d.title, "document": d.text, "question": q} for d, q in items],
                            self.answer_tokens)
        return [parse_answer(r) for r in replies]

    def verify_qa(self, items):
        replies = self._ask("verify_qa", [{"title": d.title, "document": d.text, "question": q, "answer": a}
                                          for d, q, a in items], 4)
        return [parse_verdict(r, "correct", "incorrect") for r in replies]

    def paraphrase(self, docs):
        return self._ask("paraphrase", [{"title": d.title, "document": d.text} for d in docs],
                         self.paraphrase_tokens)

    def verify_paraphrase(self, items):
        replies = self._ask("verify_paraphrase", [{"title": d.title, "document": d.text, "paraphrase": p}
                                                  for d, p in items], 4)
        return [parse_verdict(r, "yes", "no") for r in replies]


def teacher_version(kind: str, *, prompts: str = "v1", **_: Any) -> str:
    """What a teacher of ``build_teacher``'s arguments writes, as a version (without building it: spaCy and LLM
    backends are slow to load). Part of a synthesis stage's key, so changed teacher code makes new data."""
    if kind in ("openai", "transformers"):
        return PromptSet.load(prompts).version
    if kind == "natural":
        from clara.data.natural_teacher import NaturalTeacher

        return NaturalTeacher.VERSION
    if kind == "extractive":
        from clara.data.extractive_teacher import ExtractiveTeacher

        return ExtractiveTeacher.VERSION
    raise ValueError(f"unknown teacher {kind!r}; choose natural, extractive, transformers or openai")


def build_teacher(kind: str, *, model: str | None = None, base_url: str | None = None,
                  api_key_env: str = "OPENAI_API_KEY", concurrency: int = 4, prompts: str = "v1",
                  device: str = "auto", batch_size: int = 8, timeout: float = 60.0,
                  max_retries: int = 5) -> Teacher:
    """A teacher by kind: ``openai`` (needs base_url and model), ``transformers`` (model: preset or path;
    default smollm2-135m), ``natural`` (offline spaCy wh-questions) or ``extractive`` (offline cloze)."""
    if kind == "openai":
        if not base_url or not model:
            raise ValueError("the openai teacher needs --base-url and --model")
        backend = OpenAIBackend(base_url, model, api_key_env=api_key_env, concurrency=concurrency,
                                timeout=timeout, max_retries=max_retries)
        return LLMTeacher(backend, PromptSet.load(prompts))
    if kind == "transformers":
        return LLMTeacher(TransformersBackend(model or "smollm2-135m", device=device, batch_size=batch_size),
                          PromptSet.load(prompts))
    if kind == "natural":  # spaCy-based: imported (and loaded) only when asked for
        from clara.data.natural_teacher import NaturalTeacher

        return NaturalTeacher()
    if kind == "extractive":
        from clara.data.extractive_teacher import ExtractiveTeacher

        return ExtractiveTeacher()
    raise ValueError(f"unknown teacher {kind!r}; choose natural, extractive, transformers or openai")
