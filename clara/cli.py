"""The ``clara`` command line: thin wrappers that turn options into configs and call the library."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import typer

from clara.config import E2EConfig, ModelConfig  # stdlib only (cheap at start-up): option defaults and help

app = typer.Typer(help="CLaRa: compress documents into memory tokens and answer from them.", no_args_is_help=True)
train_app = typer.Typer(help="Train a stage: scp (1), instruct (2), e2e (3).", no_args_is_help=True)
model_app = typer.Typer(help="Inspect a model or checkpoint.", no_args_is_help=True)
data_app = typer.Typer(help="Corpus ingestion and data versioning (DVC).", no_args_is_help=True)
store_app = typer.Typer(help="The compressed corpus in PostgreSQL + pgvector.", no_args_is_help=True)
import_app = typer.Typer(help="Import checkpoints made elsewhere.", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
app.add_typer(store_app, name="store")
app.add_typer(import_app, name="import")

PresetOpt = typer.Option(ModelConfig.base, help="Model preset (tiny, smollm2-135m, mistral-7b) or a model path.")
ConfigOpt = typer.Option(None, help="JSON/TOML stage config; command-line options override its fields.")
DeviceOpt = typer.Option(None, help="cpu, cuda, cuda:1 … (default: auto).")
BatchOpt = typer.Option(None, help="Examples per micro-batch.")
AccumOpt = typer.Option(None, help="Micro-batches per optimizer step.")
StepsOpt = typer.Option(None, help="Optimizer steps (0: whole epochs).")
LrOpt = typer.Option(None, help="Peak learning rate.")
EveryOpt = typer.Option(None, help="Steps between resumable checkpoints.")
SeedOpt = typer.Option(None, help="Data order / dropout seed.")
ResumeOpt = typer.Option(True, help="Continue from the latest checkpoint in --out.")
DbOpt = typer.Option(None, help="Database URL (default: $CLARA_DATABASE_URL, else the embedded server).")


def _read_config(path: Optional[Path]) -> dict:
    from clara.config import read_config_file

    return read_config_file(path) if path is not None else {}


def quiet_libraries() -> None:
    """Our entry points print our output, not the libraries' deprecation notices and weight-loading bars (a
    user's own environment variables win)."""
    import warnings

    for name, value in (("TRANSFORMERS_VERBOSITY", "error"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
                        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")):
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("mlflow", "transformers", "peft", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)


def check_output(path: Path, kind: str) -> None:
    """Refuse an output path that cannot be written before any work is done (a run must not compute for minutes
    and then fail at the write): ``kind`` is ``file`` or ``dir``."""
    if kind == "file" and path.is_dir():
        raise ValueError(f"--out {path} is a directory; give a file path")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} exists and is not a directory")
    folder = path if kind == "dir" and path.is_dir() else path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"--out {path}: {folder} is not a directory, so it cannot be created")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--out {path}: {folder} is not writable")


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@train_app.command("scp")
def train_scp_cmd(
    data: Path = typer.Option(..., exists=True, dir_okay=False, help="SCP records (JSONL, authors' format)."),
    out: Path = typer.Option(..., help="Run folder: checkpoints/, metrics.jsonl and the final model/."),
    preset: str = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    rate: Optional[int] = typer.Option(None, help="Compression rate: 4, 16, 32, 64, 128 or 256."),
    length_mode: Optional[str] = typer.Option(None, help="fixed (n = max_len/rate) or proportional."),
    device: Optional[str] = DeviceOpt,
    batch_size: Optional[int] = BatchOpt,
    grad_accum: Optional[int] = AccumOpt,
    max_steps: Optional[int] = StepsOpt,
    lr: Optional[float] = LrOpt,
    checkpoint_every: Optional[int] = EveryOpt,
    seed: Optional[int] = SeedOpt,
    resume: bool = ResumeOpt,
    init: Optional[Path] = typer.Option(None, exists=True, help="Continue from this checkpoint (its base, rate "
                                                                "and adapters) instead of a fresh preset."),
) -> None:
    """Stage 1: salient compressor pretraining (compressor + generator + memory-token rows)."""
    _train_compressor(data, out, preset, config, rate, length_mode, device, batch_size, grad_accum, max_steps,
                      lr, checkpoint_every, seed, resume, stage="scp", init=init)


@train_app.command("instruct")
def train_instruct_cmd(
    data: Path = typer.Option(..., exists=True, dir_okay=False, help="QA records with their retrieved docs."),
    out: Path = typer.Option(..., help="Run folder."),
    init: Path = typer.Option(..., exists=True, help="SCP checkpoint (or run folder) to continue from."),
    config: Optional[Path] = ConfigOpt,
    device: Optional[str] = DeviceOpt,
    batch_size: Optional[int] = BatchOpt,
    grad_accum: Optional[int] = AccumOpt,
    max_steps: Optional[int] = StepsOpt,
    lr: Optional[float] = LrOpt,
    checkpoint_every: Optional[int] = EveryOpt,
    seed: Optional[int] = SeedOpt,
    resume: bool = ResumeOpt,
) -> None:
    """Stage 2: instruction tuning on QA over k compressed documents (compressor and generator continue from the
    SCP checkpoint; set fresh_generator in --config to restart the generator as the paper does)."""
    _train_compressor(data, out, "", config, None, None, device, batch_size, grad_accum, max_steps, lr,
                      checkpoint_every, seed, resume, stage="instruct", init=init)


def _train_compressor(data, out, preset, config, rate, length_mode, device, batch_size, grad_accum, max_steps, lr,
                      checkpoint_every, seed, resume, stage, init) -> None:
    from clara.config import SCPConfig, init_model_config, merged, preset as make_preset, to_dict, train_overrides
    from clara.data.records import RecordError, load_scp_records
    from clara.model import ClaraModel
    from clara.model.checkpoint import load_checkpoint
    from clara.training.scp import train_scp

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        records = load_scp_records(data)
        raw = _read_config(config)
        model_over = {k: v for k, v in dict(compression_rate=rate, length_mode=length_mode,
                                            device=device).items() if v is not None}
        if init is not None:
            model = load_checkpoint(init, device=device)
            if rate is not None and rate != model.cfg.compression_rate:
                raise ValueError(f"{init} was trained at rate {model.cfg.compression_rate}, not {rate}")
            model.cfg = init_model_config(model.cfg, raw.get("model", {}), init)
            model_cfg = to_dict(model.cfg)
        else:
            model_cfg = to_dict(make_preset(preset, **merged(raw.get("model", {}), model_over)))
        raw["model"] = model_cfg
        raw["train"] = merged(raw.get("train", {}), train_overrides(batch_size, grad_accum, max_steps, lr,
                                                                     checkpoint_every, seed))
        cfg = SCPConfig.for_stage(stage, raw)  # stage 2 has defaults of its own (INSTRUCT_DEFAULTS)
        if init is None:
            model = ClaraModel.build(cfg.model)
    except (RecordError, ValueError, OSError) as exc:
        _fail(exc)
    final = train_scp(model, records, cfg, out, stage=stage, resume=resume)
    typer.echo(f"wrote {final}")


@train_app.command("e2e")
def train_e2e_cmd(
    data: Path = typer.Option(..., exists=True, dir_okay=False,
                              help="QA records: JSONL {id, question, answers, gold_doc_ids}."),
    corpus: Path = typer.Option(..., exists=True, dir_okay=False, help="Corpus JSONL {id, title, text}."),
    out: Path = typer.Option(..., help="Run folder."),
    init: Path = typer.Option(..., exists=True, help="SCP (or instruct) checkpoint whose compressor is kept."),
    config: Optional[Path] = ConfigOpt,
    device: Optional[str] = DeviceOpt,
    candidates: Optional[int] = typer.Option(None, help=f"Candidates per question (N, default "
                                                        f"{E2EConfig.n_candidates})."),
    top_k: Optional[int] = typer.Option(None, help=f"Documents selected for the generator (k, default "
                                                   f"{E2EConfig.top_k})."),
    tau: Optional[float] = typer.Option(None, help=f"Soft top-k temperature (default {E2EConfig.tau})."),
    negatives: Optional[str] = typer.Option(None, help=f"first_stage (BM25 + MiniLM hybrid top, cached) or "
                                                       f"query_reasoner (its own top, every step); default "
                                                       f"{E2EConfig.negatives}."),
    batch_size: Optional[int] = BatchOpt,
    grad_accum: Optional[int] = AccumOpt,
    max_steps: Optional[int] = StepsOpt,
    lr: Optional[float] = LrOpt,
    checkpoint_every: Optional[int] = EveryOpt,
    seed: Optional[int] = SeedOpt,
    resume: bool = ResumeOpt,
) -> None:
    """Stage 3: train query reasoner + generator from the answer loss through differentiable top-k."""
    from clara.config import from_dict, merged, train_overrides
    from clara.data.corpus import read_corpus
    from clara.data.records import RecordError, load_qa_records
    from clara.model.checkpoint import load_checkpoint
    from clara.training.e2e import train_e2e

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        records = load_qa_records(data)
        docs = {d.id: d.full_text for d in read_corpus(corpus)}
        raw = _read_config(config)
        raw.update({k: v for k, v in dict(n_candidates=candidates, top_k=top_k, tau=tau, negatives=negatives).items()
                    if v is not None})
        raw["train"] = merged(raw.get("train", {}),
                              train_overrides(batch_size, grad_accum, max_steps, lr, checkpoint_every, seed))
        cfg = from_dict(E2EConfig, raw)
        model = load_checkpoint(init, device=device)
    except (RecordError, ValueError, OSError) as exc:
        _fail(exc)
    final = train_e2e(model, records, docs, cfg, out, resume=resume)
    typer.echo(f"wrote {final}")


@import_app.command("ml-clara")
def import_ml_clara_cmd(
    folder: Path = typer.Argument(..., exists=True, file_okay=False,
                                  help="One compression-N folder of a released CLaRa model (config.json, adapters.pth, "
                                       "decoder_first_last_layers.pth)."),
    out: Path = typer.Option(..., help="Where to write our checkpoint."),
    base: Optional[str] = typer.Option(None, help="The base model (a local folder or hub id); default: the "
                                                  "release's decoder_model_name."),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: auto)."),
) -> None:
    """Import the authors' released CLaRa weights (apple/ml-clara) once; then compress, evaluate, register and
    serve them like a model trained here (the pipeline's init_from=OUT, scp_steps=0)."""
    from clara.model.ml_clara import ReleaseError, import_ml_clara

    try:
        path = import_ml_clara(folder, out, base=base, device=device, dtype=dtype)
    except (ReleaseError, OSError) as exc:
        _fail(exc)
    typer.echo(f"wrote {path}")


@model_app.command("info")
def model_info(checkpoint: Path = typer.Argument(..., exists=True, help="Checkpoint or run folder.")) -> None:
    """Print a checkpoint's config (base model, rate, stage) as JSON."""
    from clara.model.checkpoint import read_checkpoint_config

    typer.echo(json.dumps(read_checkpoint_config(checkpoint), indent=2))


@model_app.command("release")
def model_release(
    checkpoint: Path = typer.Argument(..., exists=True, help="Checkpoint or run folder."),
    out: Path = typer.Option(..., help="Release folder (replaced if it exists)."),
    note: list[str] = typer.Option([], help="KEY=VALUE recorded in the release's clara.json (repeatable)."),
) -> None:
    """Write a compact copy of a checkpoint for shipping: adapters in bf16 (half the size), safetensors only."""
    from clara.model.checkpoint import export_release

    bad = [n for n in note if "=" not in n]
    if bad:
        raise typer.BadParameter(f"--note takes KEY=VALUE, got {bad[0]!r}")
    extra = dict(n.split("=", 1) for n in note)
    dst = export_release(checkpoint, out, extra=extra)
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    typer.echo(f"wrote {dst} ({size / 1e6:.1f} MB)")


@model_app.command("paraphrase")
def model_paraphrase(
    checkpoint: Path = typer.Argument(..., exists=True, help="Checkpoint or run folder."),
    text: str = typer.Option(..., help="Document to compress and read back."),
    max_new_tokens: int = typer.Option(128),
    device: Optional[str] = DeviceOpt,
) -> None:
    """Compress a document and print what the generator reads back from its memory tokens."""
    from clara.model.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint, device=device)
    memory = model.compress([text])[0]
    typer.echo(f"memory tokens: {memory.shape[0]} x {memory.shape[1]}  "
               f"(real ratio {model.compression_stats([text])['real_ratio']:.1f})")
    typer.echo(model.paraphrase([memory], max_new_tokens=max_new_tokens)[0])


# ------------------------------------------------------------------------------------------------ data

CorpusOpt = typer.Option(..., help="Corpus: a JSONL file {id,title,text}, a folder of .txt/.md, or 'bundled' "
                                   "(the Wikipedia summaries).")
OnErrorOpt = typer.Option("fail", help="fail: stop at the first bad row; skip: write it to the rejects file.")
SplitPresetOpt = typer.Option(ModelConfig.base, help="Preset whose tokenizer and document length decide passage "
                                                    "splitting.")


def _ingest(corpus: str, on_error: str, preset: str, max_doc_tokens: Optional[int], model_cfg=None):
    """Ingest a corpus the same way everywhere, so passage ids agree between synthesis, training, the store and
    evaluation: split with the tokenizer and document length of ``model_cfg`` (a checkpoint's) or the preset's."""
    from clara.config import preset as make_preset
    from clara.data.corpus import ingest_corpus

    return ingest_corpus(corpus, model_cfg or make_preset(preset), on_error=on_error, max_doc_tokens=max_doc_tokens)


@data_app.command("ingest")
def data_ingest(
    corpus: str = CorpusOpt,
    out: Path = typer.Option(..., help="Where to write the validated corpus (JSONL); rejects go beside it."),
    on_error: str = OnErrorOpt,
    preset: str = SplitPresetOpt,
    max_doc_tokens: Optional[int] = typer.Option(None, min=1, help="Split longer documents (default: the preset's)."),
) -> None:
    """Validate, de-duplicate and split a corpus into passages; canonical bytes, so the same DVC hash anywhere."""
    from clara.data.corpus import IngestError, write_corpus, write_rejects

    check_output(out, "file")
    try:
        docs, report = _ingest(corpus, on_error, preset, max_doc_tokens)
    except (IngestError, FileNotFoundError, ValueError) as exc:
        _fail(exc)
    write_corpus(docs, out)
    rejects = out.with_name(out.stem + ".rejects.jsonl")
    write_rejects(report.rejects, rejects)
    typer.echo(json.dumps(report.summary(), indent=2))
    typer.echo(f"wrote {out} ({len(docs)} passages); rejects: {rejects}")


@data_app.command("mix")
def data_mix(
    corpus: Path = typer.Option(..., exists=True, dir_okay=False, help="Ingested corpus JSONL (clara data ingest)."),
    out: Path = typer.Option(..., help="Folder for scp.jsonl (stage 1) and instruct.jsonl (stage 2)."),
    synth: Optional[Path] = typer.Option(None, exists=True, file_okay=False,
                                         help="A synthesis folder: its train split's QA joins stage 1 and, as "
                                              "questions over k passages, makes stage 2."),
    kinds: str = typer.Option("simple", help="Synthesized QA kinds used for stage 2 (simple, complex)."),
    k: int = typer.Option(5, help="Passages per stage-2 question: the gold one and k-1 BM25 hard negatives."),
    limit: Optional[int] = typer.Option(None, help="Only the first N passages of the corpus."),
    seed: int = typer.Option(0, help="Seed of the gold passage's slot among the k."),
    exclude: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                           help="An evaluation QA JSONL (e.g. benchmarks/dev/natural_dev.jsonl): "
                                                "synthesized QA about its gold passages or asking its questions "
                                                "is left out, so the set stays unseen."),
) -> None:
    """Training sets with no teacher: every passage reconstructs itself (stage 1); synthesized questions over k
    passages with hard negatives (stage 2). Held-out articles (``clara.data.mixes.heldout``) are left out."""
    from clara.data.records import RecordError
    from clara.stages import training_mixes

    try:
        res = training_mixes(corpus, out, synth, max_docs=limit, kinds=kinds.split(","), k=k, seed=seed,
                             exclude=exclude)
    except (RecordError, ValueError, OSError) as exc:
        _fail(exc)
    typer.echo(f"wrote {res['scp']} ({res['scp_rows']} stage-1 rows)")
    if res["instruct"]:
        typer.echo(f"wrote {res['instruct']} ({res['instruct_rows']} stage-2 rows, k={k})")
    if exclude is not None:
        typer.echo(f"left out {res['excluded_rows']} synthesized QA row(s) about {exclude}")


@app.command("synthesize")
def synthesize_cmd(
    corpus: str = CorpusOpt,
    out: Path = typer.Option(..., help="Output folder (resumed if it holds an earlier run)."),
    teacher: str = typer.Option("natural", help="natural (offline spaCy wh-questions), extractive (offline "
                                                "spaCy cloze), transformers (local LM), or openai (any "
                                                "OpenAI-compatible endpoint)."),
    model: Optional[str] = typer.Option(None, help="Teacher model: a preset/path (transformers) or a model name "
                                                   "(openai)."),
    base_url: Optional[str] = typer.Option(None, help="OpenAI-compatible base URL, e.g. http://gpu-box:8000/v1."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="Environment variable holding the API key."),
    concurrency: int = typer.Option(4, help="Requests in flight at once (openai teacher)."),
    timeout: float = typer.Option(60.0, help="Seconds per request (openai teacher)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N passages of the corpus."),
    on_error: str = OnErrorOpt,
    preset: str = SplitPresetOpt,
    coverage_rounds: int = typer.Option(2, help="Supplementary rounds for uncovered facts (paper: 10)."),
    min_coverage: float = typer.Option(0.0, help="Drop documents whose pairs cover less than this share."),
    dev_fraction: float = typer.Option(0.1, help="Share of documents in the dev split."),
    batch_docs: int = typer.Option(8, help="Documents per teacher batch."),
    seed: int = typer.Option(0, help="Split seed."),
    device: str = typer.Option("auto", help="Device of a local teacher."),
) -> None:
    """Stage 0: write simple QA, complex QA and paraphrases per document, verified against it."""
    from clara.data.corpus import IngestError, write_rejects
    from clara.data.synthesis import SynthesisConfig, synthesize
    from clara.data.teachers import TeacherError, build_teacher

    try:
        docs, ingest_report = _ingest(corpus, on_error, preset, None)
        if limit is not None:
            docs = docs[:limit]
        out.mkdir(parents=True, exist_ok=True)
        write_rejects(ingest_report.rejects, out / "corpus_rejects.jsonl")
        t = build_teacher(teacher, model=model, base_url=base_url, api_key_env=api_key_env,
                          concurrency=concurrency, device=device, timeout=timeout)
        cfg = SynthesisConfig(coverage_rounds=coverage_rounds, min_coverage=min_coverage,
                              dev_fraction=dev_fraction, seed=seed, batch_docs=batch_docs)
        report = synthesize(docs, t, out, cfg, corpus_report=ingest_report.summary())
    except (IngestError, FileNotFoundError, ValueError, TeacherError) as exc:
        _fail(exc)
    typer.echo((out / "report.md").read_text(encoding="utf-8"))
    typer.echo(f"train: {out / 'train.jsonl'}  dev: {out / 'dev.jsonl'}  ({report['documents_kept']} documents)")


@data_app.command("snapshot")
def data_snapshot(
    repo: Path = typer.Option(Path("."), help="The git + DVC repository."),
    target: str = typer.Option("data", help="The tracked folder."),
    push: bool = typer.Option(True, help="Push to the default DVC remote."),
    commit: bool = typer.Option(False, help="Also git-commit the .dvc file."),
) -> None:
    """dvc add (+ push) the data folder and print its version (the md5 in data.dvc)."""
    from clara.data.versioning import DataVersionError, snapshot

    try:
        typer.echo(snapshot(repo, target, push=push, git_commit=commit))
    except DataVersionError as exc:
        _fail(exc)


@data_app.command("version")
def data_version_cmd(repo: Path = typer.Option(Path("."), help="The git + DVC repository."),
                     target: str = typer.Option("data", help="The tracked folder.")) -> None:
    """Print the current data version (the md5 recorded in data.dvc)."""
    from clara.data.versioning import data_version

    version = data_version(repo, target)
    if version is None:
        _fail(FileNotFoundError(f"{repo / (target + '.dvc')} not found: run `clara data snapshot` first"))
    typer.echo(version)


# -------------------------------------------------------------------------------------------- evaluate

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
    limit: Optional[int] = typer.Option(None, help="A seeded sample of N questions."),
    corpus_limit: Optional[int] = typer.Option(None, help="Cut the corpus to N documents (gold always kept)."),
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
    settings: str = typer.Option("normal,oracle", help="Settings: normal, oracle (gold forced into the k), "
                                                       "oracle-candidates (the paper's: gold among the candidates)."),
    database_url: Optional[str] = DbOpt,
    device: Optional[str] = DeviceOpt,
    seed: int = typer.Option(0, help="Sampling seed."),
) -> None:
    """Compare CLaRa with raw-text RAG (BM25, MiniLM), closed book, across rates: quality, recall, cost."""
    from clara.data.corpus import IngestError
    from clara.eval.datasets import load_qa, resolve_model, subsample
    from clara.eval.run import EvalConfig, evaluate
    from clara.model.checkpoint import load_checkpoint
    from clara.store.builds import StoreError

    check_output(out, "dir")
    try:
        wanted = {int(r) for r in rates.split(",")} if rates else None
        models, refs = {}, {}
        for ref in model:
            m = load_checkpoint(resolve_model(ref, (ctx.obj or {}).get("resolve_uri")), device=device)
            if wanted is None or m.cfg.compression_rate in wanted:
                if m.cfg.compression_rate in models:
                    raise ValueError(f"two models at rate {m.cfg.compression_rate}")
                models[m.cfg.compression_rate] = m
                refs[m.cfg.compression_rate] = ref  # kept with its model: a filtered rate must not shift them
        if not models:
            raise ValueError(f"no model at the requested rates {sorted(wanted or [])}")
        # Split as the models do (all share one base); passage ids then match synthesis and training data.
        docs = _ingest(corpus, "fail", "", None, model_cfg=next(iter(models.values())).cfg)[0]
        questions, docs = subsample(load_qa(qa, docs), docs, limit, corpus_limit, seed)
        stores = None
        if use_store:
            from clara.retrieval.dense import DenseEncoder
            from clara.store.db import connect
            from clara.data.corpus import corpus_version_of
            from clara.store.loading import index_corpus

            engine = connect(database_url)
            version = corpus_version_of(docs)
            dense = DenseEncoder()
            stores = {rate: (engine, index_corpus(engine, m, docs, model_uri=str(refs[rate]), corpus_version=version,
                                                  dense=dense, reuse=True))
                      for rate, m in models.items()}
        cfg = EvalConfig(k=k, max_new_tokens=max_new_tokens, mode=mode, n_candidates=candidates, fuse=fuse,
                         settings=tuple(x for x in settings.split(",") if x),
                         baselines=tuple(b for b in baselines.split(",") if b))
        rows = evaluate(questions, docs, models, out, cfg, stores=stores,
                        progress=lambda msg: typer.echo(msg, err=True))
    except (IngestError, FileNotFoundError, ValueError, StoreError) as exc:
        _fail(exc)
    typer.echo((out / "report.md").read_text(encoding="utf-8"))
    typer.echo(f"{len(rows)} rows; predictions: {out / 'predictions.jsonl'}")


# ----------------------------------------------------------------------------------------------- store

@app.command("compress")
def compress_cmd(
    model: Path = typer.Option(..., exists=True, help="Checkpoint (or run folder) whose compressor is used."),
    corpus: str = typer.Option(..., help="Corpus JSONL {id,title,text} or 'bundled'."),
    rate: Optional[int] = typer.Option(None, help="Expected compression rate (must match the checkpoint's)."),
    database_url: Optional[str] = DbOpt,
    corpus_version: Optional[str] = typer.Option(None, help="Data version to record (default: a content hash)."),
    model_uri: Optional[str] = typer.Option(None, help="Model reference to record (default: the checkpoint path)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N documents."),
    batch_size: int = typer.Option(64, help="Documents per committed batch."),
    dense: bool = typer.Option(True, help="Also store MiniLM vectors (the dense and hybrid first stages)."),
    device: Optional[str] = DeviceOpt,
) -> None:
    """Compress a corpus offline and load it into a new index build (resumable; published when complete)."""
    from clara.data.corpus import IngestError
    from clara.model.checkpoint import load_checkpoint
    from clara.store.builds import StoreError
    from clara.store.db import connect
    from clara.data.corpus import corpus_version_of
    from clara.store.loading import index_corpus

    try:
        m = load_checkpoint(model, device=device)
        docs = _ingest(corpus, "fail", "", None, model_cfg=m.cfg)[0]
        if limit is not None:
            docs = docs[:limit]
        if rate is not None and rate != m.cfg.compression_rate:
            raise ValueError(f"{model} was trained at rate {m.cfg.compression_rate}, not {rate}")
        engine = connect(database_url)
        from clara.retrieval.dense import DenseEncoder

        build = index_corpus(engine, m, docs, model_uri=model_uri or str(model.resolve()),
                             corpus_version=corpus_version or corpus_version_of(docs), batch_size=batch_size,
                             dense=DenseEncoder() if dense else None)
    except (IngestError, FileNotFoundError, ValueError, StoreError) as exc:
        _fail(exc)
    typer.echo(json.dumps({"build_id": build.id, "status": build.status, "n_docs": build.n_docs,
                           "model_uri": build.model_uri, "rate": build.compression_rate,
                           "corpus_version": build.corpus_version, "ann": build.ann_kind,
                           "dense_model": build.dense_model}))


@store_app.command("start")
def store_start(datadir: Optional[Path] = typer.Option(None, help="Data folder (default ~/.cache/clara/pgdata).")
                ) -> None:
    """Start the embedded PostgreSQL + pgvector and leave it running; prints its URL."""
    from clara.store.db import connect
    from clara.store.server import embedded_server, sqlalchemy_url

    url = sqlalchemy_url(embedded_server(datadir, keep_running=True).get_uri())
    connect(url).dispose()  # migrate now, so the first user finds the schema
    typer.echo(url)


@store_app.command("stop")
def store_stop(datadir: Optional[Path] = typer.Option(None, help="Data folder (default ~/.cache/clara/pgdata).")
               ) -> None:
    """Stop the embedded server (data is kept)."""
    from clara.store.server import stop_embedded

    typer.echo("stopped" if stop_embedded(datadir) else "not running")


@store_app.command("builds")
def store_builds(database_url: Optional[str] = DbOpt) -> None:
    """List index builds with their status."""
    from clara.store.builds import list_builds
    from clara.store.db import connect

    for b in list_builds(connect(database_url)):
        typer.echo(f"{b.id:>5}  {b.status:<9} rate {b.compression_rate:<4} docs {b.n_docs:<8} "
                   f"{b.ann_kind:<7} {b.corpus_version}  {b.model_uri}")


if __name__ == "__main__":
    quiet_libraries()
    app()
