"""The evaluate and promote tasks: CLaRa from the store beside the raw-text baselines and closed book, then the
model registered once and the ``production`` alias moved only when the gate says so."""

# No `from __future__ import annotations`: Prefect builds a flow's and a task's parameter model (pydantic) from the
# evaluated annotations, and string annotations such as "Literal[...]" fail to resolve there.
from typing import Any, Optional

from prefect import task
from prefect.runtime import flow_run

from clara import stages
from clara.data.corpus import read_corpus
from clara_flows import PROJECT, tracking
from clara_flows.plumbing import RETRIED, checkpoint_dir, stage_run, version_missing, work_dir
from clara_flows.stagerun import exclusive, reuse, stage_key


def _evaluation_missing(result: dict[str, Any]) -> str | None:
    """The cache rule's check for evaluate: the per-question predictions the gate pairs are still logged."""
    names = {a.path for a in tracking.client().list_artifacts(result["run_id"], "evaluation")}
    return None if "evaluation/predictions.jsonl" in names else "its predictions are gone"


@task(name="evaluate", **RETRIED)
def evaluate_task(e2e: dict[str, Any], build: dict[str, Any], data: dict[str, Any], questions: int, top_k: int,
                  baselines: str, retrieval: dict[str, Any], device: Optional[str], ctx: dict[str, Any]
                  ) -> dict[str, Any]:
    """CLaRa (from the store) beside the raw-text baselines and closed book on the synthesized dev split."""
    inputs = dict(e2e=e2e, build=build, data=data, questions=questions, top_k=top_k, baselines=baselines,
                  retrieval=retrieval, device=device)
    key = stage_key("evaluate", inputs)
    with exclusive("evaluate", key):  # a second run with these inputs waits, then reuses
        found = reuse(ctx["experiment"], "evaluate", key, _evaluation_missing, ctx["refresh"])
        if found:
            return found
        from clara.eval.datasets import subsample, synth_qa
        from clara.eval.run import EvalConfig, evaluate
        from clara.model.checkpoint import load_checkpoint
        from clara.store.builds import ready_build
        from clara.store.db import connect

        out = work_dir("eval", key)
        cfg = EvalConfig(k=top_k, baselines=tuple(b for b in baselines.split(",") if b), settings=("normal",),
                         mode=retrieval["mode"], fuse=retrieval["fuse"], n_candidates=retrieval["candidates"],
                         rerank=retrieval["rerank"],
                         # the first stage alone and re-ranked, on these questions: whether the re-rank paid
                         retrieval_modes=(retrieval["mode"],))
        with stage_run("evaluate", ctx, {"model_uri": e2e["model_uri"], "build_id": build["build_id"],
                                         "questions": questions, "k": top_k, "baselines": baselines,
                                         "data_version": data["data_version"],
                                         **{f"retrieval.{k}": v for k, v in retrieval.items()}},
                       key, data, reads=(("dev", "evaluation"), ("corpus_file", "retrieval corpus"))) as st:
            docs = read_corpus(data["corpus_file"], data["max_docs"])
            qa, _ = subsample(synth_qa(data["synth_dir"], split="dev"), docs, questions, None)
            model = load_checkpoint(checkpoint_dir(e2e), device=device)
            engine = connect()
            rows = evaluate(qa, docs, {model.cfg.compression_rate: model}, out, cfg,
                            stores={model.cfg.compression_rate: (engine, ready_build(engine, build["build_id"]))},
                            progress=lambda msg: None)
            engine.dispose()
            for r in rows:
                prefix = r["system"] if r["system"] != "raw-text" else f"raw-text.{r['retriever']}"
                if r["setting"] == "retrieval":  # retrieval.hybrid, retrieval.hybrid.rerank (no '+' in MLflow names)
                    prefix = f"retrieval.{r['retriever'].replace('+', '.')}"
                tracking.log_metrics(st.c, st.run_id, {f"{prefix}.{k}": v for k, v in stages.numeric(r).items()})
            st.c.log_artifacts(st.run_id, str(out), "evaluation")
            table = (out / "report.md").read_text(encoding="utf-8")
            row = stages.clara_row(rows)
            metrics = {tracking.metric_name(k): v for k, v in stages.numeric(row).items()}
            # what the answers did, for promote to serve the same (``auto`` resolved from the retrieval rows)
            return st.finish({"metrics": metrics, "table": table, "questions": len(qa),
                              "rerank": "always" if row["rerank"] else "never",
                              "rerank_evidence": row.get("rerank_evidence")})


@task(name="promote", **RETRIED)
def promote_task(e2e: dict[str, Any], build: dict[str, Any], scores: dict[str, Any], data: dict[str, Any],
                 scp: dict[str, Any], model_name: str, gate_metric: str, gate_rule: dict[str, float], top_k: int,
                 retrieval: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    """Register the model (once per set of inputs: a rerun finds its version) and run the gate (every time, so
    the decision reflects the production version as it is now)."""
    from clara.eval.gate import GateRule
    from clara_flows.registry import PER_QUESTION_METRICS, gate, log_pyfunc, register_once

    if gate_metric not in PER_QUESTION_METRICS:
        raise ValueError(f"gate metric {gate_metric!r} cannot be compared question by question; "
                         f"choose one of {', '.join(PER_QUESTION_METRICS)}")
    inputs = dict(e2e=e2e, build=build, scores=scores, data=data, scp=scp, model_name=model_name, top_k=top_k,
                  retrieval=retrieval)
    key = stage_key("promote", inputs)
    with exclusive("promote", key):  # a second run with these inputs waits, then reuses
        registered = reuse(ctx["experiment"], "promote", key, version_missing, ctx["refresh"])
        if registered is None:
            with stage_run("promote", ctx, {"model_name": model_name, "model_uri": e2e["model_uri"],
                                            "build_id": build["build_id"]}, key) as st:
                c = st.c
                # The version serves the re-rank choice its evaluation made and measured (an evaluation cached
                # before the choice was recorded leaves the setting as it was).
                served = {**retrieval, "rerank": scores.get("rerank", retrieval["rerank"])}
                why = scores.get("rerank_evidence")
                evidence = {"retrieval.rerank_evidence": why} if why else {}
                # A killed run may have registered and died before finishing its run: that version is found, not
                # registered twice.
                version, _ = register_once(c, model_name, key, lambda: log_pyfunc(
                    e2e["run_id"], "qa", checkpoint_dir(e2e), {"build_id": build["build_id"], "k": top_k, **served},
                    input_column="question"), {
                    **{f"eval.{k}": round(v, 6) for k, v in scores["metrics"].items()}, "eval.run_id": scores["run_id"],
                    "data_version": data["data_version"], "build_id": build["build_id"], "compressor": scp["model_uri"],
                    **{f"retrieval.{k}": v for k, v in served.items()}, "retrieval.rerank_setting": retrieval["rerank"],
                    **evidence,
                    "git_commit": tracking.git_commit(PROJECT), "prefect.flow_run_id": str(flow_run.id)},
                    description="CLaRa end to end: questions -> answers from the compressed corpus in pgvector")
                tracking.set_tags(c, st.run_id, {"model_version": version})
                registered = st.finish({"name": model_name, "version": version,
                                        "model_uri": f"models:/{model_name}/{version}"})
        decision = gate(tracking.client(), model_name, registered["version"], gate_metric, rule=GateRule(**gate_rule))
        return {**registered, "alias": decision.alias, "reason": decision.reason}
