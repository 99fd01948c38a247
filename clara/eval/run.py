"""The evaluation run: CLaRa against raw-text RAG with the same base, BM25 and MiniLM retrieval, and closed book.

Every figure of a report is measured in the same run on the same machine. Questions are answered one at a time
so that the latencies are per question (retrieval and generation timed separately).

Settings, the same meaning for every system:
- ``normal``: the system's own retrieval, top k to the generator;
- ``oracle``: the gold passage forced into the k the generator reads (gold first, then the best others);
- ``oracle-candidates`` (CLaRa only, the paper's Oracle): gold added to the N candidates, the query reasoner then
  picks k, so the gold passage can still be missed.
With a store, CLaRa retrieves with ``EvalConfig.mode``'s first stage and its re-rank, and the report gets one
retrieval row per first-stage mode, alone and re-ranked by the query reasoner (what CLaRa adds).
A gold id may name a document that was split into passages: any passage of it (same ``parent_id``) counts.
An interrupted evaluation keeps the systems it finished (``_Partial``); run again as it was, it answers only the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import platform
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from clara.atomic import check_replaceable
from clara.data.corpus import Document, atomic_write_lines, corpus_version_of, dumps
from clara.data.records import QARecord
from clara.eval.likelihood import answer_nll
from clara.eval.metrics import answer_scores, mean, recall_at
from clara.eval.report import plot_report, report_markdown
from clara.retrieval.fusion import baseline
from clara.retrieval.rerank import ClaraRetriever, measured_rerank, use_rerank
from clara.retrieval.timing import StageTimes
from clara.model import ADAPTERS
from clara.model.decoding import Timing

RECALL_AT = (1, 3, 5, 20)
REPORT_KEYS = ("system", "retriever", "setting", "rate", "n", "em", "f1", "cem", "recall@1", "recall@3", "recall@5",
               "recall@20", "context_tokens", "latency_ms_p50", "latency_ms_p95", "ttft_ms_p50", "ttft_ms_p95",
               "decode_tokens_per_s", "gold_nll", "answer_tokens")
SETTINGS = ("normal", "oracle", "oracle-candidates")


@dataclass
class EvalConfig:
    k: int = 5
    """Documents handed to the generator."""
    mode: str = "hybrid"
    """With a store: CLaRa's first stage (``clara.store.search.MODES``). Without one CLaRa searches the whole
    corpus exactly (flattened cosine over an in-memory compression)."""
    n_candidates: int | None = None
    """First-stage candidates the query reasoner re-ranks (None: ``clara.store.search.DEFAULT_CANDIDATES``);
    also the pool of the ``oracle-candidates`` setting (20 when None)."""
    fuse: float = 2.0
    """Weight of the first-stage rank in CLaRa's final order (see ``clara.store.search``). 2.0 won on both dev
    sets (``benchmarks/results/retrieval.md``)."""
    rerank: str = "auto"
    """With a store: when the query reasoner re-ranks the first stage (``clara.retrieval.rerank.use_rerank``:
    ``auto``, ``always``, ``never``; ``auto`` re-ranks only with a query reasoner E2E trained, and then only if
    the retrieval rows of ``mode`` show it paid: ``measured_rerank``). The retrieval-only rows (``retrieval_modes``)
    measure the re-rank whatever this says."""
    retrieval_modes: tuple[str, ...] = ("clara", "dense", "lexical", "hybrid")
    """With a store: retrieval-only rows for these first stages, alone and re-ranked."""
    max_new_tokens: int = 64
    baselines: tuple[str, ...] = ("bm25", "minilm")
    settings: tuple[str, ...] = ("normal", "oracle")
    closed_book: bool = True
    merge: bool = True
    """Answer as the served model does (``clara.serving.Answerer``): CLaRa's generator and query reasoner, and the
    bare base for raw text and closed book, each from a copy of the base with its LoRA merged in, the QA prompt's
    fixed prefix cached (``ClaraModel.merge_adapters``, ``cache_prefix``). The latency columns then show served
    speed (decoding ~3x faster on a CPU than through the adapters under autocast); costs one more copy of the base
    weights per adapter while it runs (~2 GB on SmolLM2; at 7B ~14 GB each in bf16: False where memory is short)."""

    def __post_init__(self) -> None:
        """Every choice checked when the config is made, before a model loads: a typo in the last system to run
        would otherwise fail after the closed-book and raw-text runs."""
        from clara.retrieval.fusion import BASELINES
        from clara.retrieval.rerank import RERANK
        from clara.store.search import MODES

        problems = [f"{name} {sorted(set(given) - set(known))} (known: {', '.join(known)})"
                    for name, given, known in (("settings", self.settings, SETTINGS),
                                               ("baselines", self.baselines, BASELINES),
                                               ("retrieval_modes", self.retrieval_modes, MODES))
                    if set(given) - set(known)]
        if self.mode not in MODES:
            problems.append(f"mode {self.mode!r} (known: {', '.join(MODES)})")
        if self.rerank not in RERANK:
            problems.append(f"rerank {self.rerank!r} (known: {', '.join(RERANK)})")
        problems += [f"{name}={value} (at least {low})" for name, value, low in
                     (("k", self.k, 1), ("max_new_tokens", self.max_new_tokens, 1), ("fuse", self.fuse, 0),
                      ("n_candidates", self.n_candidates, 1)) if value is not None and value < low]
        if problems:
            raise ValueError("evaluation settings: " + "; ".join(problems))


@dataclass
class _Acc:
    """Per-question results of one (system, retriever, setting, rate)."""

    scores: list[dict[str, float]] = field(default_factory=list)
    recalls: dict[int, list[float]] = field(default_factory=lambda: {k: [] for k in RECALL_AT})
    context: list[int] = field(default_factory=list)
    retrieval_s: list[float] = field(default_factory=list)
    generation_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    decode_tps: list[float] = field(default_factory=list)
    real_ratio: list[float] = field(default_factory=list)
    gold_nll: list[float] = field(default_factory=list)
    """Per question: mean NLL per token of the first gold answer after this system's prompt (teacher-forced)."""
    answer_tokens: list[int] = field(default_factory=list)

    def generate(self, call: Callable[[Timing], str]) -> str:
        """Run one generation call with a fresh ``Timing`` and keep its total, first-token and decoding times."""
        timing = Timing()
        pred = call(timing)
        self.generation_s.append(time.perf_counter() - timing.start)
        if timing.first_token_s is not None:
            self.ttft_s.append(timing.first_token_s)
        if timing.decode_tokens_per_s is not None:
            self.decode_tps.append(timing.decode_tokens_per_s)
        return pred


class _Partial:
    """The systems an interrupted evaluation finished, one file each under ``out/partial``, with what the
    evaluation was (``identity.json``). A rerun of the same evaluation takes them back instead of answering again;
    the folder goes once the report is written. Retrieval-only rows are cheap and measured again.

    The identity has two parts. What was evaluated (settings, questions, corpus, model weights, store builds):
    finished systems of another evaluation are refused, not lost, unless ``resume`` is off. Where and by which
    code (the machine and device, whose latencies the report compares across systems, merged decoding or not, and
    the package's source): finished systems from elsewhere are discarded with a warning and answered again, so
    that a pipeline rerun on a new host is never stuck.

    Raises:
        ValueError: the folder holds another evaluation's finished systems and ``resume`` was not turned off.
    """

    def __init__(self, folder: Path, what: dict[str, Any], where: dict[str, Any], resume: bool):
        self.folder = folder
        self._loaded: dict[str, tuple[_Acc, list[str]] | None] = {}
        identity = json.loads(json.dumps({"what": what, "where": where}, sort_keys=True))  # tuples as lists
        file = folder / "identity.json"
        check_replaceable(folder, file.name, "partial evaluation")  # a file or folder of the user's is never removed
        finished = [f for f in folder.glob("*.json") if f != file] if folder.is_dir() else []
        if finished and resume:
            try:
                saved = json.loads(file.read_text(encoding="utf-8"))
                differ = sorted(k for k in set(identity["what"]) | set(saved["what"])
                                if identity["what"].get(k) != saved["what"].get(k))
                elsewhere = saved["where"] != identity["where"]
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"{file}: unreadable ({exc}); remove {folder} (or --no-resume) to start "
                                 f"over") from exc
            if differ:
                raise ValueError(f"{folder} holds the finished systems of another evaluation ({', '.join(differ)} "
                                 f"differ): run that evaluation again to finish it, or discard them with --no-resume")
            if elsewhere:
                warnings.warn(f"{folder} holds finished systems measured on another machine or by other code; "
                              f"answering them again", stacklevel=3)
                resume = False
        if not resume:
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_lines(file, [json.dumps(identity, sort_keys=True)])

    def _file(self, key: tuple) -> Path:
        return self.folder / f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}.json"

    def has(self, key: tuple) -> bool:
        """Whether ``get`` gives the system back (read once: what is skipped for it is then sure to be unneeded)."""
        return self.get(key) is not None

    def get(self, key: tuple) -> tuple[_Acc, list[str]] | None:
        """The finished system ``key`` (a report row's system, retriever, setting, rate): its per-question results
        and prediction lines; None if not finished (or its file is unreadable: answered again, with a warning)."""
        file = self._file(key)
        if file.name not in self._loaded:
            self._loaded[file.name] = self._read(file, key) if file.exists() else None
        return self._loaded[file.name]

    @staticmethod
    def _read(file: Path, key: tuple) -> tuple[_Acc, list[str]] | None:
        try:
            done = json.loads(file.read_text(encoding="utf-8"))
            acc = done["acc"]
            acc["recalls"] = {int(k): v for k, v in acc["recalls"].items()}
            return _Acc(**acc), list(done["predictions"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            warnings.warn(f"{file} is unreadable ({exc}); answering {key} again", stacklevel=4)
            return None

    def put(self, key: tuple, acc: _Acc, predictions: list[str]) -> None:
        atomic_write_lines(self._file(key), [json.dumps({"key": key, "acc": dataclasses.asdict(acc),
                                                         "predictions": predictions})])

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _weights_digest(model) -> str:
    """What a model answers with: its config (less where it runs), every adapter's weights and the special rows."""
    cfg = {k: v for k, v in dataclasses.asdict(model.cfg).items() if k != "device"}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    for p in [p for name in ADAPTERS for p in model.adapter_parameters(name)] + [model.special]:
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _source_digest() -> str:
    """The package's own source: a fixed metric, prompt or decoding is other code, whose systems are not mixed
    into one report with the old code's."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for file in sorted(root.rglob("*.py")):
        h.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes())
    return h.hexdigest()[:16]


def _identity(qa: Sequence[QARecord], docs: Sequence[Document], models: dict[int, Any], cfg: EvalConfig,
              stores: dict[int, tuple[Any, Any]] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what is evaluated, where and by which code): ``_Partial``'s two parts."""
    questions = hashlib.sha256("\n".join(dumps(dataclasses.asdict(r)) for r in qa).encode()).hexdigest()[:16]
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "merge"}  # merge: how, not what
    what = {"settings": settings, "questions": questions, "corpus": corpus_version_of(docs),
            "models": {str(rate): _weights_digest(m) for rate, m in sorted(models.items())},
            "store_builds": {str(rate): [build.id, build.corpus_version, build.model_uri]
                             for rate, (_, build) in sorted((stores or {}).items())}}
    where = {"machine": platform.node(), "devices": sorted({m.device.type for m in models.values()}),
             "merge": cfg.merge, "code": _source_digest()}
    return what, where


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values) * 1000.0, q)) if values else None


def _row(system: str, retriever: str | None, setting: str, rate: int, acc: _Acc, **extra) -> dict[str, Any]:
    total = [r + g for r, g in zip(acc.retrieval_s, acc.generation_s)] if acc.generation_s else acc.retrieval_s
    row: dict[str, Any] = {"system": system, "retriever": retriever, "setting": setting, "rate": rate,
                           "n": max(len(acc.scores), len(acc.recalls[1]))}
    for key in ("em", "f1", "cem", "em_first", "f1_first", "cem_first"):
        row[key] = mean(s[key] for s in acc.scores) if acc.scores else None
    for k in RECALL_AT:
        row[f"recall@{k}"] = mean(acc.recalls[k]) if acc.recalls[k] else None
    row["context_tokens"] = mean(acc.context) if acc.context else None
    row["latency_ms_p50"], row["latency_ms_p95"] = _pct(total, 50), _pct(total, 95)
    row["retrieval_ms_p50"], row["retrieval_ms_p95"] = _pct(acc.retrieval_s, 50), _pct(acc.retrieval_s, 95)
    row["retrieval_ms_p99"] = _pct(acc.retrieval_s, 99)
    row["generation_ms_p50"], row["generation_ms_p95"] = _pct(acc.generation_s, 50), _pct(acc.generation_s, 95)
    # Time to first token (prompt assembly + prefill) and decoding speed, as compressed-context work reports them.
    row["ttft_ms_p50"], row["ttft_ms_p95"] = _pct(acc.ttft_s, 50), _pct(acc.ttft_s, 95)
    row["decode_tokens_per_s"] = float(np.median(acc.decode_tps)) if acc.decode_tps else None
    row["real_ratio"] = mean(acc.real_ratio) if acc.real_ratio else None
    # CEM rewards a long answer that happens to contain the gold string; the gold answer's likelihood and the
    # answer length let a reader see that.
    row["gold_nll"] = mean(acc.gold_nll) if acc.gold_nll else None
    row["answer_tokens"] = mean(acc.answer_tokens) if acc.answer_tokens else None
    row.update(extra)
    return row


class Gold:
    """Gold ids resolved against the corpus: a passage id, or the id of a document split into passages."""

    def __init__(self, docs: Sequence[Document]):
        self.ids = {d.id for d in docs}
        self.passages: dict[str, list[str]] = {}  # document id -> its passages, in corpus order
        self.parent = {}
        for d in docs:
            if d.parent_id is not None:
                self.passages.setdefault(d.parent_id, []).append(d.id)
                self.parent[d.id] = d.parent_id

    def missing(self, qa: Sequence[QARecord]) -> list[str]:
        return sorted({g for r in qa for g in r.gold_doc_ids if g not in self.ids and g not in self.passages})

    def as_gold(self, r: QARecord, retrieved: Sequence[str]) -> list[str]:
        """``retrieved`` with each passage of a gold document renamed to that document (duplicates dropped), so
        that recall counts documents the way the gold ids name them."""
        gold = set(r.gold_doc_ids)
        out = [self.parent[d] if d not in gold and self.parent.get(d) in gold else d for d in retrieved]
        return list(dict.fromkeys(out))

    def recalls(self, r: QARecord, retrieved: Sequence[str], acc: _Acc) -> None:
        named = self.as_gold(r, retrieved)
        for k in RECALL_AT:
            acc.recalls[k].append(recall_at(named, r.gold_doc_ids, k))

    def forced(self, r: QARecord, ranked: Sequence[str], k: int) -> list[str]:
        """The oracle's k: a passage for every gold id (the best-ranked passage of a gold document, else its
        first), then the best retrieved others, gold first."""
        gold: list[str] = []
        for g in r.gold_doc_ids:
            if g in self.ids:
                gold.append(g)
            else:
                parts = self.passages[g]
                gold.append(next((d for d in ranked if d in parts), parts[0]))
        gold = list(dict.fromkeys(gold))[:k]
        others = [d for d in ranked if d not in gold and self.parent.get(d) not in r.gold_doc_ids]
        return gold + others[: k - len(gold)]


def evaluate(qa: Sequence[QARecord], docs: Sequence[Document], models: dict[int, Any], out_dir: str | Path,
             cfg: EvalConfig | None = None, *, stores: dict[int, tuple[Any, Any]] | None = None,
             progress: Callable[[str], None] = print, bars: bool = True, resume: bool = True
             ) -> list[dict[str, Any]]:
    """Run every system on ``qa`` and write report.json, report.md, predictions.jsonl and plots to ``out_dir``.

    Args:
        qa: questions; records without answers are scored for retrieval only.
        docs: the corpus; every gold id must be a passage id or the id of a split document.
        models: compression rate -> ClaraModel (checkpoints at several rates give one row each). A model whose
            query reasoner was never trained (no E2E) is given a copy of its compressor as query reasoner (the
            paper's initialisation); its rows say so in ``query_reasoner``.
        stores: rate -> (engine, build) to retrieve from pgvector instead of the in-memory exact index.
        bars: a progress bar per system (questions/s) on stderr.
        resume: take back the systems an interrupted run of this same evaluation finished (``_Partial``); False
            discards them and answers everything.
    """
    cfg = cfg or EvalConfig()
    if not models:
        raise ValueError("at least one CLaRa model is needed")
    gold = Gold(docs)
    missing = gold.missing(qa)
    if missing:
        raise ValueError(f"{len(missing)} gold document id(s) are missing from the corpus (neither a passage id nor "
                         f"a split document's id), e.g. {missing[:5]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    partial = _Partial(out / "partial", *_identity(qa, docs, models, cfg, stores), resume)  # before any model runs
    predictions: list[str] = []  # written whole at the end: a failed run leaves an earlier run's files as they were
    ev = _Evaluation(qa, docs, gold, next(iter(models.values())), cfg, predictions, progress, bars, partial)
    base_keys = ev.closed_book_keys() + [key for name in cfg.baselines for key in ev.raw_text_keys(name)]
    # the base's merged copy only for what is still to answer
    with contextlib.nullcontext() if all(map(partial.has, base_keys)) else ev.served(ev.base, [None]):
        rows = ev.closed_book() + [row for name in cfg.baselines for row in ev.raw_text(name)]
    for rate, model in sorted(models.items()):
        rows += ev.clara(rate, model, *(stores or {}).get(rate, (None, None)))
    atomic_write_lines(out / "predictions.jsonl", predictions)
    atomic_write_lines(out / "report.json", [json.dumps(rows, indent=2)])
    atomic_write_lines(out / "report.md", [report_markdown(rows).rstrip("\n")])
    plot_report(rows, out)
    partial.clear()
    return rows


class _Evaluation:
    """One evaluation: the systems' rows, each from the same timed loop (``run``), predictions collected as they
    come. Raw text and closed book use the first model's base with its adapters off."""

    def __init__(self, qa: Sequence[QARecord], docs: Sequence[Document], gold: Gold, base, cfg: EvalConfig,
                 predictions: list[str], progress: Callable[[str], None], bars: bool, partial: _Partial):
        self.qa, self.docs, self.gold, self.base, self.cfg, self.partial = qa, docs, gold, base, cfg, partial
        self.by_id = {d.id: d for d in docs}
        self.predictions, self.progress, self.bars = predictions, progress, bars
        self.with_answers = all(r.answers for r in qa)
        self.with_gold = all(r.gold_doc_ids for r in qa)
        self.depth = max(cfg.k, max(RECALL_AT))

    @contextlib.contextmanager
    def served(self, model, adapters: Sequence[str | None]) -> Iterator[None]:
        """``adapters`` of ``model`` run as served (``EvalConfig.merge``) inside, as trained after. A model that
        already has merged copies is left as its caller made it."""
        if not self.cfg.merge or model.merged_adapters:
            yield
            return
        model.merge_adapters(adapters)
        model.cache_prefix()
        try:
            yield
        finally:
            model.cache_prefix(False)
            model.unmerge_adapters()

    def each(self, label: str):
        self.progress(label)
        return tqdm(self.qa, desc=label, unit="q", disable=not self.bars, dynamic_ncols=True, mininterval=1.0,
                    leave=False)

    def doc_tokens(self, ids: Sequence[str]) -> int:
        return sum(len(t) for t in self.base.tokenize_texts([self.by_id[d].full_text for d in ids],
                                                            self.base.cfg.doc_max_len))

    def record(self, key: tuple[str, str | None, str, int], r: QARecord, pred: str | None,
               retrieved: list[str] | None, acc: _Acc) -> None:
        system, retriever, setting, rate = key
        entry = {"id": r.id, "system": system, "retriever": retriever, "setting": setting, "rate": rate,
                 "question": r.question, "answers": r.answers, "gold_doc_ids": r.gold_doc_ids,
                 "prediction": pred, "retrieved": retrieved}
        if pred is not None and r.answers:
            scores = answer_scores(pred, r.answers)
            acc.scores.append(scores)
            entry["scores"] = scores
        if r.gold_doc_ids and retrieved is not None:
            self.gold.recalls(r, retrieved, acc)
        if acc.retrieval_s:  # this question's time (the promotion gate compares p95 question by question)
            answer_s = acc.generation_s[-1] if pred is not None and acc.generation_s else 0.0
            entry["latency_ms"] = 1000.0 * (acc.retrieval_s[-1] + answer_s)
        self.predictions.append(dumps(entry))

    def run(self, label: str, key: tuple[str, str | None, str, int], rank, answer, context, nll) -> _Acc:
        """The one timed loop every system goes through: per question, rank (timed as retrieval; None: no
        retrieval), pick k (gold forced in for ``oracle``), answer (timed as generation), score the gold answer's
        likelihood under the same prompt (``nll(r, ids)``, untimed), record. A system an interrupted run of this
        evaluation finished is taken back instead (``_Partial``)."""
        done = self.partial.get(key)
        if done is not None:
            self.progress(f"{label}: finished by an earlier run, taken from {self.partial.folder}")
            self.predictions += done[1]
            return done[0]
        setting, acc, first = key[2], _Acc(), len(self.predictions)
        for r in self.each(label):
            ranked: list[str] | None = None
            ids: list[str] = []
            t0 = time.perf_counter()
            if rank is not None:
                ranked = rank(r)
                ids = self.gold.forced(r, ranked, self.cfg.k) if setting == "oracle" else ranked[: self.cfg.k]
            acc.retrieval_s.append(time.perf_counter() - t0 if rank is not None else 0.0)
            pred = None
            if self.with_answers:
                pred = acc.generate(lambda t: answer(r, ids, t))
                context(acc, ids)
                acc.gold_nll.append(nll(r, ids))
                acc.answer_tokens.append(len(self.base.tokenizer(pred, add_special_tokens=False)["input_ids"]))
            retrieved = ranked
            if ranked is not None and setting == "oracle":
                retrieved = ids + [d for d in ranked if d not in ids]
            self.record(key, r, pred, retrieved, acc)
        self.partial.put(key, acc, self.predictions[first:])
        return acc

    def text_nll(self, r: QARecord, ids: Sequence[str]) -> float:
        """The base model (adapters off) on the raw-text prompt with passages ``ids`` (none: closed book)."""
        row = self.base.prompter.text_qa_prompt(r.question, [self.by_id[d].full_text for d in ids])
        return answer_nll(self.base, [row], r.answers[:1], None, None)[0]

    def closed_book_keys(self, system: str = "closed-book", rate: int = 1) -> list[tuple]:
        """The row of ``system`` answering with no documents (the base's, or CLaRa's at ``rate``); none without
        answers."""
        return [(system, None, "normal", rate)] if self.cfg.closed_book and self.with_answers else []

    def raw_text_keys(self, name: str) -> list[tuple]:
        return [("raw-text", name, s, 1) for s in self.cfg.settings
                if not (s == "oracle-candidates" or (s == "oracle" and not self.with_gold))]

    def closed_book(self) -> list[dict[str, Any]]:
        rows = []
        for key in self.closed_book_keys():
            acc = self.run("closed book", key, None,
                           lambda r, ids, t: self.base.generate_from_text(
                               [r.question], [[]], max_new_tokens=self.cfg.max_new_tokens, timing=t)[0],
                           lambda acc, ids: acc.context.append(0), self.text_nll)
            rows.append(_row(*key, acc))
        return rows

    def clara_closed_book(self, rate: int, model) -> list[dict[str, Any]]:
        """CLaRa's own generator with no documents: what its answers owe to the memory is measured against this,
        not against the base model (whose fine-tuning differs)."""
        rows = []
        for key in self.closed_book_keys("clara-closed-book", rate):
            acc = self.run(f"clara closed book / rate {rate}", key, None,
                           lambda r, ids, t: model.generate([r.question], [[]], max_new_tokens=self.cfg.max_new_tokens,
                                                            timing=t)[0],
                           lambda acc, ids: acc.context.append(0),
                           lambda r, ids: answer_nll(model, [model.prompter.qa_prompt(r.question, [])], r.answers[:1],
                                                     [[]], "generator")[0])
            rows.append(_row(*key, acc))
        return rows

    def raw_text(self, name: str) -> list[dict[str, Any]]:
        """The base model reading the raw passages ``name`` (BM25, MiniLM) retrieves, in every setting."""
        keys = self.raw_text_keys(name)
        retriever = None
        if not all(map(self.partial.has, keys)):  # else every row is taken back: no index to build
            self.progress(f"indexing {name}")
            retriever = baseline(name, self.docs)
        rows = []
        for key in keys:
            setting = key[2]
            acc = self.run(f"raw-text / {name} / {setting}", key,
                           lambda r: [d for d, _ in retriever.retrieve([r.question], self.depth)[0]],
                           lambda r, ids, t: self.base.generate_from_text(
                               [r.question], [[self.by_id[d].full_text for d in ids]],
                               max_new_tokens=self.cfg.max_new_tokens, timing=t)[0],
                           lambda acc, ids: acc.context.append(self.doc_tokens(ids)), self.text_nll)
            rows.append(_row("raw-text", name, setting, 1, acc))
        return rows

    def clara(self, rate: int, model, engine=None, build=None) -> list[dict[str, Any]]:
        """CLaRa at one rate: retrieval rows (from a store), then answers in every setting."""
        query_reasoner = "trained"
        untrained = ([p.detach().clone() for p in model.adapter_parameters("query_reasoner")]
                     if model.adapter_is_zero("query_reasoner") else None)
        if model.ensure_query_reasoner():
            query_reasoner = "compressor copy (no E2E)"
            self.progress(f"rate {rate}: the query reasoner was never trained (no E2E); using the compressor")
        cfg = self.cfg
        label = cfg.mode if build is not None else "clara-exact"
        keys = self.closed_book_keys("clara-closed-book", rate) + [
            ("clara", label, s, rate) for s in cfg.settings if s == "normal" or self.with_gold]
        # Every answer row taken back and no retrieval rows to measure again (they need a store and gold): neither
        # the corpus's compression nor the merged copies are needed.
        finished = (build is None or not self.with_gold) and all(map(self.partial.has, keys))
        try:
            with contextlib.nullcontext() if finished else self.served(model, ("generator", "query_reasoner")):
                return self.clara_rows(rate, model, query_reasoner, engine, build, keys, finished)
        finally:  # the caller's model as it was: evaluated again, it is the same model (rows, identity)
            if untrained is not None:
                with torch.no_grad():
                    for p, before in zip(model.adapter_parameters("query_reasoner"), untrained):
                        p.copy_(before)

    def measured_rerank(self, rows: list[dict[str, Any]], mode: str, retriever: ClaraRetriever,
                        extra: dict[str, Any]) -> None:
        """``auto`` with an E2E-trained query reasoner: the answers re-rank only if the retrieval rows just measured
        say it paid (``clara.retrieval.rerank.measured_rerank``); the rows and the answers record the choice and
        its evidence. Without a row for ``mode`` (``retrieval_modes``) E2E training decides, as when serving."""
        first = next((r for r in rows if r["system"] == "first-stage" and r["retriever"] == mode), None)
        again = next((r for r in rows if r["setting"] == "retrieval" and r["retriever"] == f"{mode}+rerank"), None)
        found = measured_rerank(first, again, self.cfg.k) if first and again else None
        if found is None:
            return
        retriever.rerank, extra["rerank_evidence"] = found
        extra["rerank"] = retriever.rerank
        for r in rows:
            if r["setting"] == "retrieval":
                r.update(rerank=retriever.rerank, rerank_evidence=extra["rerank_evidence"])
        self.progress(f"re-rank {'kept' if retriever.rerank else 'dropped'}: {extra['rerank_evidence']}")

    def clara_rows(self, rate: int, model, query_reasoner: str, engine, build, keys: list[tuple],
                   finished: bool) -> list[dict[str, Any]]:
        """``keys``: the answer rows, CLaRa's closed book (if any) first; ``finished``: all of them taken back."""
        cfg, gold = self.cfg, self.gold
        mode = cfg.mode if build is not None else "exact"
        reranks = use_rerank(cfg.rerank, query_reasoner == "trained", mode)
        retriever = None
        if not finished:
            self.progress(f"compressing the corpus at rate {rate}" if build is None else f"using store build "
                                                                                         f"{build.id}")
            retriever = ClaraRetriever(model, self.docs, engine=engine, build=build, mode=mode,
                                       candidates=cfg.n_candidates, fuse=cfg.fuse, rerank=reranks)
        extra = {"query_reasoner": query_reasoner, "mode": mode, "fuse": cfg.fuse, "rerank": reranks}
        rows = []
        if build is not None and self.with_gold:
            rows += _retrieval_rows(self.qa, retriever, cfg, rate, gold, self.each, extra)
            if cfg.rerank == "auto" and reranks and mode != "clara":
                self.measured_rerank(rows, mode, retriever, extra)

        def rank(r: QARecord, setting: str) -> list[str]:
            if setting != "oracle-candidates":  # as served
                return [d for d, _ in retriever.retrieve_batch([r.question], self.depth)[0]]
            query = retriever.encode([r.question])[0]
            # The paper's Oracle: gold added to the N candidates, then the query reasoner picks k.
            pool = [d for d, _ in retriever.retrieve(r.question, query, retriever.n_candidates)]
            cand = list(dict.fromkeys(gold.forced(r, pool, 1) + pool))[: retriever.n_candidates]
            return [d for d, _ in sorted(zip(cand, retriever.score_docs(query, cand)), key=lambda x: -x[1])]

        def context(acc: _Acc, ids: list[str]) -> None:
            n_mem = sum(retriever.memory_of(d).shape[0] for d in ids)
            acc.context.append(n_mem)
            acc.real_ratio.append(self.doc_tokens(ids) / max(1, n_mem))

        def nll(r: QARecord, ids: list[str]) -> float:
            mems = [retriever.memory_of(d) for d in ids]
            row = model.prompter.qa_prompt(r.question, [m.shape[0] for m in mems])
            return answer_nll(model, [row], r.answers[:1], [[m.to(model.device) for m in mems]], "generator")[0]

        rows += self.clara_closed_book(rate, model)
        for key in keys:
            if key[0] != "clara":
                continue
            setting = key[2]
            acc = self.run(f"clara / rate {rate} / {setting}", key,
                           lambda r, setting=setting: rank(r, setting),
                           lambda r, ids, t: model.generate([r.question], [[retriever.memory_of(d) for d in ids]],
                                                            max_new_tokens=cfg.max_new_tokens, timing=t)[0],
                           context, nll)
            rows.append(_row("clara", key[1], setting, rate, acc, **extra))
        return rows


def _retrieval_rows(qa: Sequence[QARecord], retriever: ClaraRetriever, cfg: EvalConfig, rate: int, gold: Gold,
                    each, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """Per first-stage mode: the first stage alone, then re-ranked by the query reasoner (retrieval only)."""
    rows = []
    depth = max(RECALL_AT)
    for mode in cfg.retrieval_modes:
        alone, reranked = _Acc(), _Acc()
        stages = StageTimes()
        for r in each(f"retrieval / rate {rate} / {mode}"):
            t0 = time.perf_counter()
            first = retriever.first_stage(r.question, mode, depth)
            alone.retrieval_s.append(time.perf_counter() - t0)
            gold.recalls(r, [d for d, _ in first], alone)
            t0 = time.perf_counter()
            retriever.times = stages  # where the re-ranked retrieval's time goes, stage by stage
            ranked = retriever.retrieve_batch([r.question], depth, mode=mode, rerank=True)[0]
            retriever.times = None
            reranked.retrieval_s.append(time.perf_counter() - t0)
            gold.recalls(r, [d for d, _ in ranked], reranked)
        rows.append(_row("first-stage", mode, "retrieval", rate, alone, **extra))
        rows.append(_row("clara", f"{mode}+rerank", "retrieval", rate, reranked, **extra,
                         retrieval_stages_ms_p50=stages.p50()))
    return rows
