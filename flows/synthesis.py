"""The synthesize subflow: ingest the corpus, synthesize its QA and paraphrases in shards (the task runner maps them),
merge, build the training mixes, and version it all with DVC."""

# No `from __future__ import annotations`: Prefect builds a flow's and a task's parameter model (pydantic) from the
# evaluated annotations, and string annotations such as "Literal[...]" fail to resolve there.
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner

from clara import stages
from clara.data.corpus import corpus_name, prepare_corpus
from clara_flows import tracking
from clara_flows.plumbing import dataset_inputs, stage_run, transient, work_dir
from clara_flows.stagerun import exclusive, reuse, stage_key


@task(name="ingest-corpus", retries=1, retry_condition_fn=transient)
def ingest_task(corpus: str, preset: str, project_dir: str) -> dict[str, Any]:
    from clara.config import preset as make_preset

    out = Path(project_dir) / "data" / "corpus" / f"{corpus_name(corpus)}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    return prepare_corpus(corpus, make_preset(preset), out)


@task(name="synthesize-shard", retries=2, retry_delay_seconds=10, retry_condition_fn=transient)
def synthesize_shard_task(corpus_file: str, start: int, end: int, out_dir: str, teacher: dict[str, Any],
                          cfg: dict[str, Any]) -> dict[str, Any]:
    return stages.synthesize_shard(corpus_file, start, end, out_dir, teacher, cfg)


@task(name="dvc-snapshot", retries=2, retry_delay_seconds=5)
def snapshot_task(project_dir: str, push: bool) -> str:
    from clara.data.versioning import snapshot

    return snapshot(project_dir, "data", push=push)


@flow(name="synthesize", task_runner=ThreadPoolTaskRunner(max_workers=1))
def synthesis_flow(corpus: str, max_docs: Optional[int], preset: str, teacher: dict[str, Any], shards: int,
                   project_dir: str, dvc_push: bool, parent_run: str, experiment: str, refresh: bool = False,
                   seed: int = 0) -> dict[str, Any]:
    """Corpus -> data/corpus/<name>.jsonl; teacher -> data/synth/<name>/ (train/dev); then a DVC snapshot.

    The work always runs (finished shards are found, not redone; the data version is known only after the
    snapshot); the run that records it is skipped when one with the same inputs and data version exists."""
    log = get_run_logger()
    name = corpus_name(corpus)
    prepared = ingest_task(corpus, preset, project_dir)
    corpus_file = prepared["path"]
    n = min(prepared["documents"], max_docs) if max_docs else prepared["documents"]
    cfg = {"seed": seed}
    from clara.data.teachers import teacher_version

    # the teacher's version too: changed teacher code must make new shards, not resume the old ones
    work_key = stage_key("synthesize", {"source": prepared["key"], "n": n, "teacher": teacher, "cfg": cfg,
                                        "teacher_version": teacher_version(**teacher)})
    ranges = stages.shard_ranges(n, shards)
    work = work_dir("synth", work_key)
    shard_dirs = [str(work / f"shard-{i:04d}") for i in range(len(ranges))]
    futures = [synthesize_shard_task.submit(corpus_file, s, e, d, teacher, cfg)
               for (s, e), d in zip(ranges, shard_dirs)]
    shard_reports = [f.result() for f in futures]
    out = Path(project_dir) / "data" / "synth" / name
    report = stages.merge_synthesis(shard_dirs, out, cfg, corpus_report=prepared["report"])
    mixes = stages.training_mixes(corpus_file, out / "mix", out, max_docs=n, seed=seed)
    version = snapshot_task(project_dir, dvc_push)
    log.info("synthesized %d documents in %d shard(s); data version %s", n, len(ranges), version)
    data = {"data_version": version, "corpus_file": corpus_file, "max_docs": n, "synth_dir": str(out),
            "scp_file": mixes["scp"], "instruct_file": mixes["instruct"],
            "corpus_version": version if n == prepared["documents"] else f"{version}/first-{n}",
            "project_dir": project_dir}
    ctx = {"parent_run": parent_run, "experiment": experiment}
    # The pipeline's own run lists the data it trains and is judged on too: its row in the runs table (where the
    # stage runs are folded away) then names the data version instead of "-".
    tracking.log_datasets(tracking.client(), parent_run, dataset_inputs(data, (
        ("corpus_file", "corpus"), ("scp_file", "training"), ("instruct_file", "training"), ("train", "training"),
        ("dev", "evaluation"))))
    key = stage_key("synthesize", {"work": work_key, **data})
    with exclusive("synthesize", key):  # a second run with these inputs waits, then reuses
        found = reuse(experiment, "synthesize", key, lambda r: None, refresh)  # the files were just written
        if found:
            return found
        with stage_run("synthesize", ctx, {"corpus": corpus, "max_docs": max_docs, "shards": len(ranges),
                                           "teacher": teacher, "data_version": version}, key,
                       data, reads=(("corpus_file", "source corpus"),)) as st:
            tracking.set_tags(st.c, st.run_id, {"data_version": version})
            tracking.log_metrics(st.c, st.run_id, {
                "documents_in": report["documents_in"], "documents_kept": report["documents_kept"],
                "yield_documents": report["yield_documents"],
                "verification_pass_rate": report["verification_pass_rate"],
                "mean_coverage_kept": report["mean_coverage_kept"],
                "seconds": sum(r["seconds_this_run"] for r in shard_reports),
                **{f"rows.{k}": v for k, v in report["rows_out"].items()}})
            st.c.log_dict(st.run_id, report, "synthesis/report.json")
            st.c.log_artifact(st.run_id, str(out / "report.md"), "synthesis")
            st.c.log_artifact(st.run_id, str(Path(project_dir) / "data.dvc"))
            return st.finish(data)
