"""The natural teacher: wh-questions rewritten from spaCy parses, definitions, joined questions, verification."""

import pytest

from clara.data.corpus import Document
from clara.data.synthesis import SynthesisConfig, synthesize
from clara.data.natural_teacher import NaturalTeacher
from clara.data.teachers import build_teacher

EINSTEIN = Document("Albert Einstein", "Albert Einstein",
                    "Albert Einstein was a German-born theoretical physicist. He was born in Ulm in 1879. "
                    "He developed the theory of relativity. In 1921, he received the Nobel Prize in Physics. "
                    "Einstein had 2 sons with Mileva Marić.")
MARS_P0 = Document("Mars#p0", "Mars", "Mars is the fourth planet from the Sun. Mars has 2 moons.", "Mars")
MARS_P1 = Document("Mars#p1", "Mars", "Mars is a red planet. The planet was named after the Roman god of war.",
                   "Mars")


@pytest.fixture(scope="module")
def teacher():
    return NaturalTeacher()


def pairs(teacher, doc, kind="simple", limit=20):
    return {(p.question, p.answer) for p in teacher.propose([doc], kind, limit)[0]}


def test_role_and_entity_type_choose_the_wh_word(teacher):
    got = pairs(teacher, EINSTEIN)
    # a place or a date after "in" is removed with its preposition; the auxiliary moves before the subject
    assert ("Where was Albert Einstein born in 1879?", "Ulm") in got
    assert ("When was Albert Einstein born in Ulm?", "1879") in got
    # no auxiliary: do-support in the verb's tense, the verb as its lemma; a leading adjunct moves to the end
    assert ("What did Albert Einstein develop?", "the theory of relativity") in got
    assert ("When did Albert Einstein receive the Nobel Prize in Physics?", "1921") in got
    # a number before a noun asks "how many <noun>"
    assert ("How many sons did Einstein have with Mileva Marić?", "2") in got
    # a named subject is replaced by its wh-word
    assert ("Who had 2 sons with Mileva Marić?", "Einstein") in got


def test_an_object_named_by_a_modified_common_noun_is_asked_with_which(teacher):
    doc = Document("Kurosawa", "Akira Kurosawa",
                   "Akira Kurosawa directed the Japanese film Rashomon in 1950. Gaudi designed the Sagrada Familia "
                   "church in Barcelona. The Mongols destroyed the Persian capital. Edison invented the electric "
                   "light bulb.")
    got = pairs(teacher, doc)
    assert ("Which film did Akira Kurosawa direct in 1950?", "the Japanese film Rashomon") in got
    assert ("Which church did Gaudi design?", "the Sagrada Familia church in Barcelona") in got
    # no proper noun in the phrase: "which capital?" answered by "the Persian capital" names nothing; and a
    # phrase with no capitalised modifier stays a "what" question
    assert not any(q.startswith("Which capital") for q, _ in got)
    assert ("What did Edison invent?", "the electric light bulb") in got


def test_pronoun_subjects_become_the_title_and_nothing_gives_its_answer_away(teacher):
    for q, a in pairs(teacher, EINSTEIN):
        assert q.endswith("?") and q[0].isupper()
        assert not q.split()[1:3] == ["was", "he"] and " he " not in q.lower()
        assert a.lower() not in q.lower()


def test_definitions_only_from_an_articles_first_passage(teacher):
    assert ("Who was Albert Einstein?", "a German-born theoretical physicist") in pairs(teacher, EINSTEIN)
    assert ("What is Mars?", "the fourth planet from the Sun") in pairs(teacher, MARS_P0)
    assert not any(q == "What is Mars?" for q, _ in pairs(teacher, MARS_P1))


def test_a_definition_is_more_than_a_bare_head_noun(teacher):
    # the complement is too long to keep (and holds a relative clause), so the answer would be "the study"
    doc = Document("Algebra#p0", "Abstract algebra",
                   "Abstract algebra is the study of algebraic structures, which are sets with operations that "
                   "satisfy certain axioms. Emmy Noether shaped the field in 1921.", "Abstract algebra")
    assert not any(q.lower() == "what is abstract algebra?" for q, _ in pairs(teacher, doc))
    accra = Document("Accra#p0", "Accra", "Accra is the capital city of Ghana.", "Accra")
    assert ("What is Accra?", "the capital city of Ghana") in pairs(teacher, accra)


def test_complex_questions_join_two_sentences_with_both_answers(teacher):
    got = teacher.propose([EINSTEIN], "complex", 3)[0]
    assert got and all(", and " in p.question and p.answer.count("; ") == 1 for p in got)
    a = got[0].answer
    assert all(part in EINSTEIN.text for part in a.split("; "))


def test_verify_needs_a_grounded_answer_the_question_does_not_contain(teacher):
    assert teacher.verify_qa([(EINSTEIN, "Where was Einstein born?", "Ulm"),
                              (EINSTEIN, "Where was Einstein born?", "Berlin"),
                              (EINSTEIN, "Was Einstein born in Ulm?", "Ulm")]) == [True, False, False]


def test_cover_asks_about_the_sentences_it_is_given(teacher):
    got = teacher.cover([EINSTEIN], [["He developed the theory of relativity."]], 5)[0]
    assert [p.answer for p in got] == ["the theory of relativity"]


def test_natural_teacher_through_synthesis(tmp_path):
    teacher = build_teacher("natural")
    assert isinstance(teacher, NaturalTeacher)
    report = synthesize([EINSTEIN, MARS_P0], teacher, tmp_path / "s", SynthesisConfig(dev_fraction=0.0),
                        progress=False)
    assert report["documents_done"] == 2 and report["rows_out"]["simple"] >= 2
    rows = [l for l in (tmp_path / "s" / "train.jsonl").read_text().splitlines()]
    assert rows and all('"natural:spacy-wh"' in r for r in rows)
    with pytest.raises(ValueError, match="natural"):
        build_teacher("socratic")
