"""`clara evaluate` and `clara compress`: the evaluation run and the corpus compressed into a store build."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from clara.cli.common import fail, app, check_output, DbOpt, DeviceOpt, ingest


def _models_by_rate(refs: list[str], rates: str | None, resolve_uri, device: str | None) -> tuple[dict, dict]:
    """The models to evaluate, keyed by compression rate (only ``rates`` when given, e.g. '16,32'), and the
    reference each was loaded from (kept with its model: a filtered rate must not shift them)."""
    from clara.eval.datasets import resolve_model
    from clara.model.checkpoint import load_checkpoint

    try:
        wanted = {int(r) for r in rates.split(",")} if rates else None
    except ValueError:
        raise ValueError(f"--rates {rates!r}: expected compression rates separated by commas, e.g. 16,32") from None
    models, by_rate = {}, {}
    for ref in refs:
        m = load_checkpoint(resolve_model(ref, resolve_uri), device=device)
        if wanted is None or m.cfg.compression_rate in wanted:
            if m.cfg.compression_rate in models:
                raise ValueError(f"two models at rate {m.cfg.compression_rate}")
            models[m.cfg.compression_rate] = m
            by_rate[m.cfg.compression_rate] = ref
    if not models:
        raise ValueError(f"no model at the requested rates {sorted(wanted or [])}")
    return models, by_rate


def _stores(models: dict, refs: dict, docs, database_url: str | None) -> dict:
    """Each model's store build of ``docs`` (compressed now when the store has none), by rate."""
    from clara.data.corpus import corpus_version_of
    from clara.retrieval.dense import DenseEncoder
    from clara.store.db import connect
    from clara.store.loading import index_corpus

    engine = connect(database_url)
    version = corpus_version_of(docs)
    dense = DenseEncoder()
    return {rate: (engine, index_corpus(engine, m, docs, model_uri=str(refs[rate]), corpus_version=version,
                                        dense=dense, reuse=True))
            for rate, m in models.items()}


@app.command("evaluate")
def evaluate_cmd(
    ctx: typer.Context,
    qa: str = typer.Option(..., help="QA JSONL {id, question, answers, gold_doc_ids}, 'synth:DIR' (the synthesized "
                                     "dev split) or 'descriptions' (description -> article, retrieval only)."),
    corpus: str = typer.Option(..., help="Corpus JSONL {id,title,text} or 'bundled'."),
    model: list[str] = typer.Option(..., help="Checkpoint folder or MLflow URI; repeat for several rates."),
    out: Path = typer.Option(..., help="Output folder: report.json, report.md, predictions.jsonl, plots."),
    rates: Optional[str] = typer.Option(None, help="Only these compression rates, e.g. '16,32'."),
    k: int = typer.Option(5, help="Documents given to the generator."),
    limit: Optional[int] = typer.Option(None, min=1, help="A seeded sample of N questions."),
    corpus_limit: Optional[int] = typer.Option(None, min=1, help="Cut the corpus to N documents (gold always kept)."),
    max_new_tokens: int = typer.Option(64, help="Greedy decoding budget."),
    baselines: str = typer.Option("bm25,minilm", help="Raw-text retrievers to compare ('' for none)."),
    use_store: bool = typer.Option(False, help="Retrieve from a pgvector build (compressed now if missing) "
                                                "instead of an exact in-memory index."),
    mode: str = typer.Option("hybrid", help="With --use-store: CLaRa's first stage (clara, dense, lexical, "
                                            "hybrid) before the query reasoner's re-rank."),
    candidates: Optional[int] = typer.Option(None, help="First-stage candidates re-ranked (default: 20; 100 for "
                                                        "mode clara)."),
    fuse: float = typer.Option(2.0, help="Weight of the first-stage rank in CLaRa's final order (0: the query "
                                         "reasoner's order alone)."),
    rerank: str = typer.Option("auto", help="With --use-store: when the query reasoner re-ranks the first stage "
                                            "(auto: only when E2E trained it; always; never)."),
    settings: str = typer.Option("normal,oracle", help="Settings: normal, oracle (gold forced into the k), "
                                                       "oracle-candidates (the paper's: gold among the candidates)."),
    merge: bool = typer.Option(True, help="Answer from merged copies of the base, as the served model does (served "
                                           "speed; one more copy of the base weights per adapter)."),
    database_url: Optional[str] = DbOpt,
    device: Optional[str] = DeviceOpt,
    seed: int = typer.Option(0, help="Sampling seed."),
    resume: bool = typer.Option(True, help="Take back the systems an interrupted run of this same evaluation "
                                           "finished (kept in OUT/partial); --no-resume answers everything again."),
) -> None:
    """Compare CLaRa with raw-text RAG (BM25, MiniLM), closed book, across rates: quality, recall, cost."""
    from clara.data.corpus import IngestError
    from clara.eval.datasets import load_qa, subsample
    from clara.eval.run import EvalConfig, evaluate
    from clara.store.builds import StoreError

    check_output(out, "dir")
    try:
        cfg = EvalConfig(k=k, max_new_tokens=max_new_tokens, mode=mode, n_candidates=candidates, fuse=fuse,
                         merge=merge, rerank=rerank, settings=tuple(x for x in settings.split(",") if x),
                         baselines=tuple(b for b in baselines.split(",") if b))
        if not use_store and (cfg.mode, cfg.rerank) != (EvalConfig.mode, EvalConfig.rerank):
            raise ValueError("--mode and --rerank choose how CLaRa searches a store build: add --use-store (without "
                             "it CLaRa searches the whole corpus exactly, and they would not apply)")
        # read before any model loads (minutes at 7B); only 'descriptions' is made from the corpus itself
        questions = None if qa == "descriptions" else load_qa(qa, [])
        models, refs = _models_by_rate(model, rates, (ctx.obj or {}).get("resolve_uri"), device)
        # Split as the models do (all share one base); passage ids then match synthesis and training data.
        docs = ingest(corpus, "fail", "", None, model_cfg=next(iter(models.values())).cfg)[0]
        questions, docs = subsample(load_qa(qa, docs) if questions is None else questions, docs, limit,
                                     corpus_limit, seed)
        stores = _stores(models, refs, docs, database_url) if use_store else None
        rows = evaluate(questions, docs, models, out, cfg, stores=stores,
                        progress=lambda msg: typer.echo(msg, err=True), resume=resume)
    except (IngestError, FileNotFoundError, ValueError, StoreError) as exc:
        fail(exc)
    typer.echo((out / "report.md").read_text(encoding="utf-8"))
    typer.echo(f"{len(rows)} rows; predictions: {out / 'predictions.jsonl'}")


# ---------------------------------------------------------------------------------------- compress the corpus

@app.command("compress")
def compress_cmd(
    model: Path = typer.Option(..., exists=True, help="Checkpoint (or run folder) whose compressor is used."),
    corpus: str = typer.Option(..., help="Corpus JSONL {id,title,text} or 'bundled'."),
    rate: Optional[int] = typer.Option(None, help="Expected compression rate (must match the checkpoint's)."),
    database_url: Optional[str] = DbOpt,
    corpus_version: Optional[str] = typer.Option(None, help="Data version to record (default: a content hash)."),
    model_uri: Optional[str] = typer.Option(None, help="Model reference to record (default: the checkpoint path)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N documents."),
    batch_size: int = typer.Option(64, min=1, help="Documents per committed batch."),
    dense: bool = typer.Option(True, help="Also store MiniLM vectors (the dense and hybrid first stages)."),
    device: Optional[str] = DeviceOpt,
) -> None:
    """Compress a corpus offline and load it into a new index build (resumable; published when complete)."""
    from clara.config import ModelConfig, from_dict, refuse_changes, to_dict
    from clara.data.corpus import IngestError
    from clara.model.checkpoint import load_checkpoint, read_checkpoint_config
    from clara.store.builds import StoreError
    from clara.store.db import connect
    from clara.data.corpus import corpus_version_of
    from clara.store.loading import index_corpus

    try:
        if rate is not None:  # from the checkpoint's config: refused before the model loads or the corpus is read
            trained = to_dict(from_dict(ModelConfig, read_checkpoint_config(model)["model"]))  # defaults filled in
            refuse_changes(trained, {"compression_rate": rate}, model, "an index of it")
        engine = connect(database_url)  # a wrong or unreachable database is said before the model loads
        m = load_checkpoint(model, device=device)
        docs = ingest(corpus, "fail", "", None, model_cfg=m.cfg)[0]
        if limit is not None:
            docs = docs[:limit]
        from clara.retrieval.dense import DenseEncoder

        build = index_corpus(engine, m, docs, model_uri=model_uri or str(model.resolve()),
                             corpus_version=corpus_version or corpus_version_of(docs), batch_size=batch_size,
                             dense=DenseEncoder() if dense else None)
    except (IngestError, FileNotFoundError, ValueError, StoreError) as exc:
        fail(exc)
    typer.echo(json.dumps({"build_id": build.id, "status": build.status, "n_docs": build.n_docs,
                           "model_uri": build.model_uri, "rate": build.compression_rate,
                           "corpus_version": build.corpus_version, "ann": build.ann_kind,
                           "dense_model": build.dense_model}))
