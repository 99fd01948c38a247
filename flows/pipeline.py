"""The CLaRa pipeline: the parent Prefect flow that chains the stages, thin wrappers over the library that track
everything in MLflow.

    clara (parent flow ``full_pipeline``, deployment ``full-pipeline``)
      synthesize        subflow (flows/synthesis.py): ingest -> synthesize shards (map) -> merge -> DVC snapshot + push
      pretrain_scp      task (flows/training.py): SCP training (every passage reconstructed + synthesized QA),
                        registers ``clara-compressor``
      instruct          task (flows/training.py): stage 2, QA over k compressed passages (gold + hard negatives)
      train_e2e         task (flows/training.py): end-to-end training (query reasoner + generator)
      compress_corpus   subflow (flows/storage.py): compress shards (map) -> load + publish a pgvector build
      evaluate          task (flows/evaluation.py): CLaRa vs baselines on the synthesized dev split, from the store
      promote           task (flows/evaluation.py): register ``clara`` and move ``production`` only if it beats the
                        current one

Names above are the Prefect and MLflow names (stage keys and run names use them); the Python functions end in
``_task``/``_flow`` so that none shadows the library function it calls. What the stages share is
``clara_flows.plumbing``.

Each stage receives explicit references from the one before (data version, run ids, model URIs, build id) and
returns its own as a small JSON dict. Whether a stage is skipped is decided by one rule (``clara_flows.stagerun``): a
finished run of that stage with the same input key whose outputs still exist; its recorded result is returned
and the reason is logged. The shard tasks and the store are idempotent by themselves (finished shards and
published builds are found and reused), and an interrupted stage resumes from its own checkpoints. Two runs
with the same inputs at once: the second waits for the first at each stage (a lock on the shared Postgres) and
then reuses its result. Shards run on the flow's task runner: threads by default, a Dask cluster when
``dask_address`` or ``dask_workers`` is set.
"""

# No `from __future__ import annotations`: Prefect builds a flow's and a task's parameter model (pydantic) from the
# evaluated annotations, and string annotations such as "Literal[...]" fail to resolve there.
from pathlib import Path
from typing import Any, Literal, Optional

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from clara_flows import PROJECT, params, profiles, tracking
from clara_flows.evaluation import evaluate_task, promote_task
from clara_flows.stagerun import PipelineRun
from clara_flows.storage import compression_flow
from clara_flows.synthesis import synthesis_flow
from clara_flows.training import e2e_task, instruct_task, scp_task


def task_runner(dask_address: Optional[str], dask_workers: int):
    """Threads (one at a time: torch already uses every core) unless a Dask cluster is asked for."""
    if dask_address or dask_workers:
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": dask_workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    return ThreadPoolTaskRunner(max_workers=1)


def _summary(result: dict[str, Any], exp: str) -> str:
    uri = tracking.tracking_uri()
    p = result["promotion"]
    lines = [f"# CLaRa pipeline `{result['flow_run']}`", "",
             f"- data version: `{result['data']['data_version']}` (corpus `{result['data']['corpus_version']}`)",
             f"- store build: **{result['build']['build_id']}** ({result['build']['n_docs']} documents"
             f"{', reused' if result['build'].get('reused') else ''})",
             f"- model: [{p['name']} v{p['version']}]({tracking.model_url(p['name'], p['version'], uri)}) -> "
             f"**{p['alias']}**: {p['reason']}", "",
             f"## Evaluation ({result['evaluation']['questions']} synthesized dev questions)", "",
             result["evaluation"]["table"], "", *_rerank_line(result["evaluation"]), "## MLflow runs", "",
             f"- [pipeline]({tracking.run_url(result['parent_run'], exp, uri)})"]
    for stage in ("synthesize", "pretrain_scp", "instruct", "train_e2e", "compress_corpus", "evaluate", "promote"):
        run = result["runs"].get(stage)
        if run:
            cached = " (cached)" if stage in result["cached"] else ""
            lines.append(f"- [{stage}]({tracking.run_url(run, exp, uri)}){cached}")
    return "\n".join(lines) + "\n"


def _rerank_line(evaluation: dict[str, Any]) -> list[str]:
    """Whether the answers (and so the registered version) re-rank, and the retrieval rows that decided it."""
    if "rerank" not in evaluation:  # an evaluation cached before the choice was recorded
        return []
    why = f": {evaluation['rerank_evidence']}" if evaluation.get("rerank_evidence") else ""
    return [f"Query-reasoner re-rank: **{'on' if evaluation['rerank'] == 'always' else 'off'}**{why}.", ""]


def check_parameters(p: dict[str, Any]) -> None:
    """Every budget and choice the stages would otherwise reject late (after minutes of synthesis or training),
    all reported at once."""
    from clara.config import COMPRESSION_RATES, SCPConfig
    from clara.training.distributed import Dist

    problems = []
    if p["compression_rate"] not in COMPRESSION_RATES:
        problems.append(f"compression_rate={p['compression_rate']} (one of {', '.join(map(str, COMPRESSION_RATES))})")
    at_least = {"top_k": 1, "n_candidates": 1, "eval_questions": 1, "shards": 1, "train_processes": 1,
                "scp_batch_size": 1, "instruct_batch_size": 1, "e2e_batch_size": 1, "max_docs": 0,
                "scp_steps": 0, "instruct_steps": 0, "e2e_steps": 0, "dask_workers": 0}
    for name, low in at_least.items():
        value = p.get(name)
        if value is not None and value < low:
            problems.append(f"{name}={value} (at least {low})")
    for stage in ("scp", "instruct", "e2e"):  # under torchrun each process takes an equal slice of every batch
        size, steps, n = p.get(f"{stage}_batch_size"), p.get(f"{stage}_steps"), p.get("train_processes") or 1
        if n > 1 and steps and size:
            try:
                Dist(0, n).shard(range(size))
            except ValueError as exc:
                problems.append(f"{stage}_batch_size={size}, train_processes={n}: {exc}")
    if p["n_candidates"] < p["top_k"]:
        problems.append(f"n_candidates={p['n_candidates']} is below top_k={p['top_k']}")
    for name in ("scp_lr", "instruct_lr", "e2e_lr"):
        if not p[name] > 0:
            problems.append(f"{name}={p[name]} (must be > 0)")
    # the stage configs own these rules (as Dist owns the one above): ask them, and name the parameters that fed them
    stage_fields = {"scp_target_dropout": "target_dropout", "instruct_freeze_compressor": "freeze_compressor",
                    "instruct_compressor_lr_scale": "compressor_lr_scale"}
    for stage in ("scp", "instruct"):
        given = {k: p[k] for k in stage_fields if k.startswith(stage + "_") and p.get(k) is not None}
        try:
            SCPConfig(**{stage_fields[k]: v for k, v in given.items()})
        except ValueError as exc:
            problems.append(f"{', '.join(f'{k}={v}' for k, v in given.items())}: {exc}")
    if p["retrieval_fuse"] < 0 or p["gate_max_latency_regression"] < 0:
        problems.append("retrieval_fuse and gate_max_latency_regression must be >= 0")
    problems += _model_problems(p["preset"])
    if problems:
        raise ValueError("invalid parameters: " + "; ".join(problems))


def _model_problems(name: str) -> list[str]:
    """A preset that is neither bundled nor readable (a local folder, or a hub id this machine can fetch or has
    cached) would fail only when SCP loads it, after synthesis: read its config now instead."""
    from clara.config import preset

    base = preset(name).base
    if base in ("tiny", "smollm2-135m"):  # built or converted locally from installed packages
        return []
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return [f"preset={name!r}: not a bundled preset (tiny, smollm2-135m), and no model config could be read "
                f"from {base!r} ({first})"]
    return []


@flow(name="clara", log_prints=True)  # deployment clara/full-pipeline: the name users type
def full_pipeline(
    profile: Literal["demo", "quality", "gpu"] = "demo",
    data: params.Data = params.Data(),
    model: params.Model = params.Model(),
    training: params.Training = params.Training(),
    evaluation: params.Evaluation = params.Evaluation(),
    gate: params.Gate = params.Gate(),
    execution: params.Execution = params.Execution(),
) -> dict[str, Any]:
    """Synthesize -> SCP -> instruct -> E2E -> compress the corpus into pgvector -> evaluate -> promote.

    ``profile`` sets the budgets (``clara_flows.profiles``: ``demo`` runs on a CPU laptop in minutes, ``quality`` for
    hours on a CPU, ``gpu`` on one GPU); a budget given explicitly wins (``data.max_docs=0``: the whole corpus).
    ``model.init_from``: a checkpoint folder to continue SCP from (``training.scp_steps=0`` uses it as it is;
    relative to the project folder; ``none`` turns the profile's off). The groups are ``clara_flows.params``.
    """
    p = {"profile": profile, **params.flat({"data": data, "model": model, "training": training,
                                             "evaluation": evaluation, "gate": gate, "execution": execution})}
    ex, ev, t = execution, evaluation, training
    project = str(Path(ex.project_dir).resolve()) if ex.project_dir else str(PROJECT)
    run = PipelineRun.start(ex.experiment, str(flow_run.id), str(flow_run.name), tracking.git_commit(project))
    try:
        b = _budget(p, project)  # bad parameters fail here, before any stage, with the reason on the run
        tracking.log_params(tracking.client(), run.run_id, {**p, **b})
        ctx = {"parent_run": run.run_id, "experiment": ex.experiment, "refresh": ex.refresh_cache}
        runner = task_runner(ex.dask_address, ex.dask_workers)
        retrieval = {"mode": ev.retrieval_mode, "fuse": ev.retrieval_fuse, "candidates": ev.n_candidates,
                     "rerank": ev.retrieval_rerank}

        synthesized = run.record("synthesize", synthesis_flow.with_options(task_runner=runner)(
            corpus=data.corpus, max_docs=b["max_docs"] or None, preset=model.preset, shards=data.shards,
            project_dir=project, teacher={"kind": data.teacher, "model": data.teacher_model,
                                          "base_url": data.teacher_base_url},
            dvc_push=data.dvc_push, parent_run=run.run_id, experiment=ex.experiment, refresh=ex.refresh_cache))
        scp = run.record("pretrain_scp", scp_task(
            data=synthesized, preset=model.preset, compression_rate=model.compression_rate,
            memory_readout=model.memory_readout, steps=b["scp_steps"], batch_size=b["scp_batch_size"], lr=t.scp_lr,
            target_dropout=b["scp_target_dropout"], init_from=b["init_from"], device=model.device,
            processes=t.train_processes, ctx=ctx))
        inst = run.record("instruct", instruct_task(
            scp=scp, data=synthesized, steps=b["instruct_steps"], batch_size=b["instruct_batch_size"],
            lr=t.instruct_lr, device=model.device, ctx=ctx, freeze_compressor=t.instruct_freeze_compressor,
            compressor_lr_scale=t.instruct_compressor_lr_scale, processes=t.train_processes))
        e2e = run.record("train_e2e", e2e_task(
            init=inst, data=synthesized, steps=b["e2e_steps"], batch_size=b["e2e_batch_size"], lr=t.e2e_lr,
            top_k=ev.top_k, n_candidates=ev.n_candidates, device=model.device, processes=t.train_processes,
            ctx=ctx))
        build = run.record("compress_corpus", compression_flow.with_options(task_runner=runner)(
            e2e=e2e, data=synthesized, shards=data.shards, batch_size=16, device=model.device,
            parent_run=run.run_id, experiment=ex.experiment, refresh=ex.refresh_cache))
        scores = run.record("evaluate", evaluate_task(
            e2e=e2e, build=build, data=synthesized, questions=b["eval_questions"], top_k=ev.top_k,
            baselines=ev.baselines, retrieval=retrieval, device=model.device, ctx=ctx))
        run.record("promote", promote_task(
            e2e=e2e, build=build, scores=scores, data=synthesized, scp=scp, model_name=gate.model_name,
            gate_metric=gate.gate_metric, gate_rule={"margin": gate.gate_margin,
                                                     "max_latency_regression": gate.gate_max_latency_regression},
            top_k=ev.top_k, retrieval=retrieval, ctx=ctx))
        return _report(run)
    except BaseException as exc:
        run.fail(exc)
        raise


def _budget(p: dict[str, Any], project: str) -> dict[str, Any]:
    """The profile's budgets with the explicit parameters on top, checked; ``init_from`` made absolute."""
    budget = profiles.resolve(p["profile"], {k: p[k] for k in profiles.PROFILES["demo"]})
    check_parameters({**p, **budget})
    init = budget["init_from"]
    if init and not Path(init).is_absolute():
        budget["init_from"] = str(Path(project) / init)
    return budget


def _report(run: PipelineRun) -> dict[str, Any]:
    """Finish the parent run (tags, metrics, summary) and return what every stage returned."""
    s = run.stages
    result = {"flow_run": run.flow_run_name, "parent_run": run.run_id, "data": s["synthesize"],
              "scp": s["pretrain_scp"], "instruct": s["instruct"], "e2e": s["train_e2e"], "build": s["compress_corpus"],
              "evaluation": s["evaluate"], "promotion": s["promote"], "cached": run.cached,
              "runs": {k: None if r.get("skipped") else r.get("run_id") for k, r in s.items()}}
    summary = _summary(result, run.exp_id)
    p = result["promotion"]
    run.finish({"data_version": result["data"]["data_version"], "corpus_version": result["data"]["corpus_version"],
                "build_id": result["build"]["build_id"], "model_version": p["version"], "alias": p["alias"],
                "gate_reason": p["reason"]},
               {f"eval.{k}": v for k, v in result["evaluation"]["metrics"].items()}, summary)
    create_markdown_artifact(summary, key="clara-evaluation",
                             description="CLaRa evaluation and model promotion for this pipeline run")
    print(summary)
    return result
