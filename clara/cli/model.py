"""`clara model info|release|paraphrase` and `clara import ml-clara`: inspect, export and import checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from clara.cli.common import fail, DeviceOpt, import_app, model_app


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
        fail(exc)
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
    from clara.model.checkpoint import export_release, release_notes

    try:
        extra = release_notes(note)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    dst = export_release(checkpoint, out, extra=extra)
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    typer.echo(f"wrote {dst} ({size / 1e6:.1f} MB)")


@model_app.command("average")
def model_average(
    checkpoints: list[Path] = typer.Argument(..., exists=True, help="Two or more checkpoints of one model."),
    out: Path = typer.Option(..., help="Folder for the averaged checkpoint (replaced if it is one)."),
    weight: list[float] = typer.Option([], help="One weight per checkpoint, summing to 1 (default: equal)."),
) -> None:
    """Average checkpoints of one model in weight space (runs that share an ancestor): each LoRA layer's product,
    refactored to the adapter's rank, and the special rows."""
    from clara.model.checkpoint import average_checkpoints

    try:
        residual = average_checkpoints(checkpoints, out, weights=weight or None)
    except (ValueError, OSError) as exc:
        fail(exc)
    typer.echo(f"wrote {out}; rank-r refactoring error (relative Frobenius) per adapter: "
               + ", ".join(f"{k} {v:.2e}" for k, v in residual.items()))


@model_app.command("paraphrase")
def model_paraphrase(
    checkpoint: Path = typer.Argument(..., exists=True, help="Checkpoint or run folder."),
    text: str = typer.Option(..., help="Document to compress and read back."),
    max_new_tokens: int = typer.Option(128),
    device: Optional[str] = DeviceOpt,
) -> None:
    """Compress a document and print what the generator reads back from its memory tokens."""
    from clara.model.checkpoint import load_checkpoint
    from clara.model.memory import compression_stats

    model = load_checkpoint(checkpoint, device=device)
    memory = model.compress([text])[0]
    stats = compression_stats(model.cfg, [len(t) for t in model.tokenize_texts([text], model.cfg.doc_max_len)])
    typer.echo(f"memory tokens: {memory.shape[0]} x {memory.shape[1]}  (real ratio {stats['real_ratio']:.1f})")
    typer.echo(model.paraphrase([memory], max_new_tokens=max_new_tokens)[0])
