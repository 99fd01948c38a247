"""The ``clara`` command line: thin wrappers that turn options into configs and call the library."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="CLaRa: compress documents into memory tokens and answer from them.", no_args_is_help=True)
train_app = typer.Typer(help="Train a stage: scp (1), instruct (2), e2e (3).", no_args_is_help=True)
model_app = typer.Typer(help="Inspect a model or checkpoint.", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(model_app, name="model")

PresetOpt = typer.Option("smollm2-135m", help="Model preset (tiny, smollm2-135m, mistral-7b) or a model path.")
ConfigOpt = typer.Option(None, help="JSON/TOML stage config; command-line options override its fields.")
DeviceOpt = typer.Option(None, help="cpu, cuda, cuda:1 … (default: auto).")
BatchOpt = typer.Option(None, help="Examples per micro-batch.")
AccumOpt = typer.Option(None, help="Micro-batches per optimizer step.")
StepsOpt = typer.Option(None, help="Optimizer steps (0: whole epochs).")
LrOpt = typer.Option(None, help="Peak learning rate.")
EveryOpt = typer.Option(None, help="Steps between resumable checkpoints.")
SeedOpt = typer.Option(None, help="Data order / dropout seed.")
ResumeOpt = typer.Option(True, help="Continue from the latest checkpoint in --out.")


def _train_overrides(batch_size, grad_accum, max_steps, lr, checkpoint_every, seed) -> dict:
    train: dict = {k: v for k, v in dict(batch_size=batch_size, grad_accum=grad_accum, max_steps=max_steps,
                                         checkpoint_every=checkpoint_every, seed=seed).items() if v is not None}
    if lr is not None:
        train["optim"] = {"lr": lr}
    return train


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def _read_config(path: Optional[Path]) -> dict:
    from clara.config import read_config_file

    return read_config_file(path) if path is not None else {}


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
) -> None:
    """Stage 1: salient compressor pretraining (compressor + generator + memory-token rows)."""
    _train_compressor(data, out, preset, config, rate, length_mode, device, batch_size, grad_accum, max_steps,
                      lr, checkpoint_every, seed, resume, stage="scp", init=None)


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
    """Stage 2: instruction tuning on QA over k compressed documents (fresh generator, compressor continues)."""
    _train_compressor(data, out, "", config, None, None, device, batch_size, grad_accum, max_steps, lr,
                      checkpoint_every, seed, resume, stage="instruct", init=init)


def _train_compressor(data, out, preset, config, rate, length_mode, device, batch_size, grad_accum, max_steps, lr,
                      checkpoint_every, seed, resume, stage, init) -> None:
    from clara.config import SCPConfig, _from_dict, preset as make_preset, to_dict
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
            model_cfg = to_dict(model.cfg)
        else:
            model_cfg = to_dict(make_preset(preset, **_merge(raw.get("model", {}), model_over)))
        raw["model"] = model_cfg
        raw["train"] = _merge(raw.get("train", {}), _train_overrides(batch_size, grad_accum, max_steps, lr,
                                                                     checkpoint_every, seed))
        cfg = _from_dict(SCPConfig, raw)
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
    candidates: Optional[int] = typer.Option(None, help="Candidates per question (N, default 20)."),
    top_k: Optional[int] = typer.Option(None, help="Documents selected for the generator (k, default 5)."),
    tau: Optional[float] = typer.Option(None, help="Soft top-k temperature (default 0.02)."),
    batch_size: Optional[int] = BatchOpt,
    grad_accum: Optional[int] = AccumOpt,
    max_steps: Optional[int] = StepsOpt,
    lr: Optional[float] = LrOpt,
    checkpoint_every: Optional[int] = EveryOpt,
    seed: Optional[int] = SeedOpt,
    resume: bool = ResumeOpt,
) -> None:
    """Stage 3: train query reasoner + generator from the answer loss through differentiable top-k."""
    from clara.config import E2EConfig, _from_dict
    from clara.data.records import RecordError, load_corpus, load_qa_records
    from clara.model.checkpoint import load_checkpoint
    from clara.training.e2e import train_e2e

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        records = load_qa_records(data)
        docs = load_corpus(corpus)
        raw = _read_config(config)
        raw.update({k: v for k, v in dict(n_candidates=candidates, top_k=top_k, tau=tau).items() if v is not None})
        raw["train"] = _merge(raw.get("train", {}),
                              _train_overrides(batch_size, grad_accum, max_steps, lr, checkpoint_every, seed))
        cfg = _from_dict(E2EConfig, raw)
        model = load_checkpoint(init, device=device)
    except (RecordError, ValueError, OSError) as exc:
        _fail(exc)
    final = train_e2e(model, records, docs, cfg, out, resume=resume)
    typer.echo(f"wrote {final}")


@model_app.command("info")
def model_info(checkpoint: Path = typer.Argument(..., exists=True, help="Checkpoint or run folder.")) -> None:
    """Print a checkpoint's config (base model, rate, stage) as JSON."""
    from clara.model.checkpoint import read_checkpoint_config

    typer.echo(json.dumps(read_checkpoint_config(checkpoint), indent=2))


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


if __name__ == "__main__":
    app()
