"""`clara data ingest|mix|snapshot|version` and `clara synthesize`: corpora, synthesized training data, DVC."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from clara.cli.common import fail, app, check_output, data_app, ingest
from clara.config import ModelConfig


CorpusOpt = typer.Option(..., help="Corpus: a JSONL file {id,title,text}, a folder of .txt/.md, or 'bundled' "
                                   "(the Wikipedia summaries).")
OnErrorOpt = typer.Option("fail", help="fail: stop at the first bad row; skip: write it to the rejects file.")
SplitPresetOpt = typer.Option(ModelConfig.base, help="Preset whose tokenizer and document length decide passage "
                                                    "splitting.")


@data_app.command("ingest")
def dataingest(
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
        docs, report = ingest(corpus, on_error, preset, max_doc_tokens)
    except (IngestError, FileNotFoundError, ValueError) as exc:
        fail(exc)
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
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N passages of the corpus."),
    seed: int = typer.Option(0, help="Seed of the gold passage's slot among the k."),
    exclude: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                           help="An evaluation QA JSONL (e.g. benchmarks/dev/natural_dev.jsonl): "
                                                "synthesized QA about its gold passages or asking its questions "
                                                "is left out, so the set stays unseen."),
    reconstruction_share: float = typer.Option(1.0, help="Fraction of passages (by a hash of the id) that get a "
                                                         "stage-1 reconstruction row; below 1 the mix leans "
                                                         "toward the QA rows."),
) -> None:
    """Training sets with no teacher: every passage reconstructs itself (stage 1); synthesized questions over k
    passages with hard negatives (stage 2). Held-out articles (``clara.data.mixes.heldout``) are left out."""
    from clara.data.records import RecordError
    from clara.stages import training_mixes

    try:
        check_output(out, "dir")
        res = training_mixes(corpus, out, synth, max_docs=limit, kinds=kinds.split(","), k=k, seed=seed,
                             exclude=exclude, reconstruction_share=reconstruction_share)
    except (RecordError, ValueError, OSError) as exc:
        fail(exc)
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
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N passages of the corpus."),
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

    try:  # nothing is written before the settings, --out, the corpus and the teacher are known to be good
        cfg = SynthesisConfig(coverage_rounds=coverage_rounds, min_coverage=min_coverage,
                              dev_fraction=dev_fraction, seed=seed, batch_docs=batch_docs)
        check_output(out, "dir")
        docs, ingest_report = ingest(corpus, on_error, preset, None)
        if limit is not None:
            docs = docs[:limit]
        t = build_teacher(teacher, model=model, base_url=base_url, api_key_env=api_key_env,
                          concurrency=concurrency, device=device, timeout=timeout)
        out.mkdir(parents=True, exist_ok=True)
        write_rejects(ingest_report.rejects, out / "corpus_rejects.jsonl")
        report = synthesize(docs, t, out, cfg, corpus_report=ingest_report.summary())
    except (IngestError, FileNotFoundError, ValueError, TeacherError) as exc:
        fail(exc)
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
        fail(exc)


@data_app.command("version")
def data_version_cmd(repo: Path = typer.Option(Path("."), help="The git + DVC repository."),
                     target: str = typer.Option("data", help="The tracked folder.")) -> None:
    """Print the current data version (the md5 recorded in data.dvc)."""
    from clara.data.versioning import DataVersionError, data_version

    try:
        version = data_version(repo, target)
    except DataVersionError as exc:
        fail(exc)
    if version is None:
        fail(FileNotFoundError(f"{repo / (target + '.dvc')} not found: run `clara data snapshot` first"))
    typer.echo(version)
