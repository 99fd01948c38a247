"""The three training stages as Prefect tasks: SCP (registers the compressor), stage 2 (instruct) and E2E. Each
builds its typed config, trains through the library (``clara.training``) in this process or under torchrun, and
records the checkpoint in MLflow; a stage whose inputs match a finished run is reused, not retrained."""

# No `from __future__ import annotations`: Prefect builds a flow's and a task's parameter model (pydantic) from the
# evaluated annotations, and string annotations such as "Literal[...]" fail to resolve there.
import json
from pathlib import Path
from typing import Any, Optional

from prefect import task

from clara import stages
from clara.data.corpus import read_corpus
from clara_flows import tracking
from clara_flows.plumbing import (RETRIED, LiveMetrics, checkpoint_dir, checkpoint_missing, stage_run, torchrun,
                                  work_dir)
from clara_flows.stagerun import exclusive, reuse, stage_key


@task(name="pretrain_scp", **RETRIED)
def scp_task(data: dict[str, Any], preset: str, compression_rate: int, memory_readout: str, steps: int,
             batch_size: int, lr: float, target_dropout: float, init_from: Optional[str], device: Optional[str],
             processes: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """Stage 1 (SCP): compressor + generator on every passage's reconstruction and the synthesized QA;
    registers the compressor as ``clara-compressor``."""
    inputs = dict(data=data, preset=preset, compression_rate=compression_rate, memory_readout=memory_readout,
                  steps=steps, batch_size=batch_size, lr=lr, init_from=init_from, device=device, processes=processes)
    if target_dropout:  # only when set, so the paper recipe's stage keys stay what they were
        inputs["target_dropout"] = target_dropout
    from clara.model.checkpoint import checkpoint_digest, resolve_checkpoint

    start = stages.scp_start(init_from, preset, compression_rate, memory_readout)  # refused before anything else
    if init_from:  # a release replaced in place under the same path is another starting point: another run
        inputs["init_digest"] = checkpoint_digest(init_from)
    key = stage_key("pretrain_scp", inputs)
    with exclusive("pretrain_scp", key):  # a second run with these inputs waits, then reuses
        found = reuse(ctx["experiment"], "pretrain_scp", key, checkpoint_missing, ctx["refresh"])
        if found:
            return found
        from clara.config import to_dict
        from clara.data.records import load_scp_records
        from clara.model import ClaraModel
        from clara.model.checkpoint import load_checkpoint
        from clara.training.scp import train_scp
        from clara_flows.registry import log_pyfunc, register_once

        budget = stages.stage_budget(steps, batch_size, lr)
        cfg = stages.scp_config(preset, compression_rate, memory_readout, start, budget, target_dropout, device)
        with stage_run("pretrain_scp", ctx,
                       {"data_version": data["data_version"], "init_from": init_from, **to_dict(cfg)},
                       key, data, reads=(("scp_file", "training"),)) as st:
            tracking.set_tags(st.c, st.run_id, {"data_version": data["data_version"]})
            work, train_file = work_dir("scp", key), Path(data["scp_file"])
            if init_from and steps == 0:  # a trained starting point, used as it is
                final = resolve_checkpoint(init_from)
            elif processes > 1:
                init = resolve_checkpoint(init_from) if init_from else None
                final = _train_under_torchrun(processes, "scp", cfg, train_file, work, st, init, device, preset)
            else:
                model = load_checkpoint(init_from, device=device) if init_from else ClaraModel.build(cfg.model)
                live = LiveMetrics(st.c, st.run_id)
                final = train_scp(model, load_scp_records(train_file), cfg, work, callback=live, progress=False,
                                  start=inputs.get("init_digest"))
                live.replay_if_silent(work)
            version, _ = register_once(
                st.c, "clara-compressor", key,
                lambda: log_pyfunc(st.run_id, "compressor", final, {}, input_column="text"),
                {"data_version": data["data_version"], "compression_rate": compression_rate, "preset": preset},
                description="CLaRa compressor (SCP): documents -> memory tokens")
            return st.finish({"checkpoint": str(final), "model_uri": f"models:/clara-compressor/{version}",
                              "version": version})


def _train_under_torchrun(processes: int, stage: str, cfg, train_file: Path, work: Path, st, init: Optional[Path],
                          device: Optional[str], preset: Optional[str] = None) -> Path:
    """Stage 1 or 2 as ``clara train scp|instruct`` under torchrun, one process per GPU. The stage's whole config
    goes in a file, so the processes train exactly the model and recipe the stage recorded; from ``init`` the
    model table only restates that checkpoint's (the command refuses a change to what shapes its weights)."""
    from clara.config import to_dict

    work.mkdir(parents=True, exist_ok=True)
    (work / "train.json").write_text(json.dumps(to_dict(cfg)))
    start = ["--init", str(init)] if init else ["--preset", preset, "--rate", str(cfg.model.compression_rate)]
    return torchrun(processes, ["train", stage, "--data", str(train_file), "--out", str(work), *start,
                                "--config", str(work / "train.json"), *(["--device", device] if device else [])],
                    work, st.c, st.run_id)


@task(name="instruct", **RETRIED)
def instruct_task(scp: dict[str, Any], data: dict[str, Any], steps: int, batch_size: int, lr: float,
                  device: Optional[str], ctx: dict[str, Any], freeze_compressor: bool,
                  compressor_lr_scale: float = 1.0, processes: int = 1) -> dict[str, Any]:
    """Stage 2: each synthesized question over its gold passage and k-1 hard negatives, compressed; the
    generator continues from SCP (and the compressor too, at ``compressor_lr_scale`` of the rate, unless
    ``freeze_compressor``). No steps (or no questions): SCP's checkpoint passes through."""
    if steps <= 0 or not data.get("instruct_file"):
        return {**scp, "skipped": True, "reused": False}
    inputs = dict(scp=scp, data=data, steps=steps, batch_size=batch_size, lr=lr, device=device,
                  freeze_compressor=freeze_compressor)
    if compressor_lr_scale != 1.0:  # only then: the keys of runs from before the option stay what they were
        inputs["compressor_lr_scale"] = compressor_lr_scale
    if processes > 1:  # the same; and like SCP's and E2E's keys, another launch is another run
        inputs["processes"] = processes
    key = stage_key("instruct", inputs)
    with exclusive("instruct", key):  # a second run with these inputs waits, then reuses
        found = reuse(ctx["experiment"], "instruct", key, checkpoint_missing, ctx["refresh"])
        if found:
            return found
        from clara.config import ModelConfig, SCPConfig, from_dict, to_dict
        from clara.data.records import load_scp_records
        from clara.model.checkpoint import checkpoint_digest, load_checkpoint, read_checkpoint_config
        from clara.training.scp import train_scp

        start = checkpoint_dir(scp)  # its config read, not the model loaded: under torchrun the processes load it
        model_cfg = {**read_checkpoint_config(start)["model"], **({"device": device} if device else {})}
        cfg = SCPConfig(model=from_dict(ModelConfig, model_cfg), train=stages.stage_budget(steps, batch_size, lr),
                        freeze_compressor=freeze_compressor, compressor_lr_scale=compressor_lr_scale)
        with stage_run("instruct", ctx,
                       {"data_version": data["data_version"], "init": scp["model_uri"], **to_dict(cfg)},
                       key, data, reads=(("instruct_file", "training"),)) as st:
            tracking.set_tags(st.c, st.run_id, {"data_version": data["data_version"], "init": scp["model_uri"]})
            work, train_file = work_dir("instruct", key), Path(data["instruct_file"])
            if processes > 1:
                final = _train_under_torchrun(processes, "instruct", cfg, train_file, work, st, start, device)
            else:
                model, live = load_checkpoint(start, device=device), LiveMetrics(st.c, st.run_id)
                final = train_scp(model, load_scp_records(train_file), cfg, work, stage="instruct", callback=live,
                                  progress=False, start=checkpoint_digest(start))
                live.replay_if_silent(work)
            st.c.log_artifacts(st.run_id, str(final), "checkpoint")  # safetensors + JSON, no pickles
            return st.finish({"checkpoint": str(final), "model_uri": f"runs:/{st.run_id}/checkpoint"})


@task(name="train_e2e", **RETRIED)
def e2e_task(init: dict[str, Any], data: dict[str, Any], steps: int, batch_size: int, lr: float, top_k: int,
             n_candidates: int, device: Optional[str], processes: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """Stage 3: query reasoner + generator end to end through the differentiable top-k."""
    inputs = dict(init=init, data=data, steps=steps, batch_size=batch_size, lr=lr, top_k=top_k,
                  n_candidates=n_candidates, device=device, processes=processes)
    key = stage_key("train_e2e", inputs)
    with exclusive("train_e2e", key):  # a second run with these inputs waits, then reuses
        found = reuse(ctx["experiment"], "train_e2e", key, checkpoint_missing, ctx["refresh"])
        if found:
            return found
        from clara.config import E2EConfig, to_dict
        from clara.eval.datasets import synth_qa
        from clara.model.checkpoint import checkpoint_digest, load_checkpoint, read_checkpoint_config
        from clara.training.e2e import train_e2e

        cfg = E2EConfig(train=stages.stage_budget(steps, batch_size, lr), n_candidates=n_candidates, top_k=top_k)
        with stage_run("train_e2e", ctx,
                       {"data_version": data["data_version"], "init": init["model_uri"], **to_dict(cfg)},
                       key, data, reads=(("train", "training"), ("corpus_file", "retrieval corpus"))) as st:
            tracking.set_tags(st.c, st.run_id, {"data_version": data["data_version"], "init": init["model_uri"]})
            docs = read_corpus(data["corpus_file"], data["max_docs"])
            qa = synth_qa(data["synth_dir"], split="train")
            work = work_dir("e2e", key)
            if processes > 1:
                from clara.data.corpus import atomic_write_lines, write_corpus

                work.mkdir(parents=True, exist_ok=True)
                atomic_write_lines(work / "qa.jsonl", (json.dumps(vars(r)) for r in qa))
                write_corpus(docs, work / "corpus.jsonl")
                (work / "e2e.json").write_text(json.dumps(to_dict(cfg)))
                final = torchrun(processes, ["train", "e2e", "--data", str(work / "qa.jsonl"), "--corpus",
                                              str(work / "corpus.jsonl"), "--init", str(checkpoint_dir(init)), "--out",
                                              str(work), "--config", str(work / "e2e.json"),
                                              *(["--device", device] if device else [])], work, st.c, st.run_id)
            else:
                model, live = load_checkpoint(checkpoint_dir(init), device=device), LiveMetrics(st.c, st.run_id)
                corpus = {d.id: d.full_text for d in docs}
                final = train_e2e(model, qa, corpus, cfg, work, callback=live, progress=False,
                                  start=checkpoint_digest(checkpoint_dir(init)))
                live.replay_if_silent(work)
            st.c.log_artifacts(st.run_id, str(final), "checkpoint")  # safetensors + JSON, no pickles
            return st.finish({"checkpoint": str(final), "model_uri": f"runs:/{st.run_id}/checkpoint",
                              "rate": read_checkpoint_config(final)["model"]["compression_rate"]})
