"""`clara train scp|instruct|e2e`: the three training stages."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from clara.cli.common import (_read_config, AccumOpt, BatchOpt, check_output, ConfigOpt, DeviceOpt, EveryOpt, fail,
                              LrOpt, PresetOpt, ResumeOpt, SeedOpt, StepsOpt, train_app)
from clara.config import E2EConfig


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
    _train_compressor(data, out, None, config, None, None, device, batch_size, grad_accum, max_steps, lr,
                      checkpoint_every, seed, resume, stage="instruct", init=init)


def _train_compressor(data, out, preset, config, rate, length_mode, device, batch_size, grad_accum, max_steps, lr,
                      checkpoint_every, seed, resume, stage, init) -> None:
    from clara.config import (ModelConfig, SCPConfig, TrainConfig, from_dict, init_model_config, merged,
                              preset as make_preset, to_dict, train_overrides)
    from clara.data.records import RecordError, load_scp_records
    from clara.model import ClaraModel
    from clara.model.checkpoint import checkpoint_digest, load_checkpoint
    from clara.model.special import continue_with
    from clara.training.distributed import setup
    from clara.training.scp import train_scp

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    setup()  # under torchrun: pin this process to its own GPU before a model is built ("cuda" is the current one)
    try:
        check_output(out, "dir")
        records = load_scp_records(data)
        raw = _read_config(config)
        raw["train"] = merged(raw.get("train", {}), train_overrides(batch_size, grad_accum, max_steps, lr,
                                                                     checkpoint_every, seed))
        from_dict(TrainConfig, raw["train"])  # out-of-range settings are said before a model loads
        model_over = {k: v for k, v in dict(compression_rate=rate, length_mode=length_mode,
                                            device=device).items() if v is not None}
        over = merged(raw.get("model", {}), model_over)
        if init is not None:
            model = load_checkpoint(init, device=device)
            if preset not in (None, ModelConfig.base):  # given (the default cannot be told from absent): its base
                over["base"] = make_preset(preset).base
            continue_with(model, init_model_config(model.cfg, over, init))  # --rate, --length-mode must match it
            model_cfg = to_dict(model.cfg)
        else:
            model_cfg = to_dict(make_preset(preset, **over))
        raw["model"] = model_cfg
        cfg = SCPConfig.for_stage(stage, raw)  # stage 2 has defaults of its own (INSTRUCT_DEFAULTS)
        if init is None:
            model = ClaraModel.build(cfg.model)
    except (RecordError, ValueError, OSError) as exc:
        fail(exc)
    final = train_scp(model, records, cfg, out, stage=stage, resume=resume,
                      start=checkpoint_digest(init) if init is not None else None)
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
    from clara.model.checkpoint import checkpoint_digest, load_checkpoint
    from clara.training.distributed import setup
    from clara.training.e2e import train_e2e

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    setup()  # as in _train_compressor: each process on its own GPU before the model is loaded
    try:
        check_output(out, "dir")
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
        fail(exc)
    final = train_e2e(model, records, docs, cfg, out, resume=resume, start=checkpoint_digest(init))
    typer.echo(f"wrote {final}")
