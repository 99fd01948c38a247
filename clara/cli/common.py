"""What the ``clara`` command's groups share: the Typer apps, the common options, and how a command reports a user's
mistake (one line, exit 2)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import typer

from clara.config import ModelConfig  # stdlib only (cheap at start-up): option defaults

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
ResumeOpt = typer.Option(True, help="Continue from the latest checkpoint in --out (--no-resume: start over; refused "
                                           "where --out holds step checkpoints).")
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


def user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the kind a user's input causes (a bad path, file, value) or a peer's answer (a database,
    teacher or registry that refused or is down: ``ClaraError``, or MLflow's own) and deserves one line, not a
    traceback. Programming errors (TypeError, KeyError, …) keep their traceback."""
    from clara.errors import ClaraError

    return isinstance(exc, (OSError, ValueError, ClaraError)) or type(exc).__module__.startswith("mlflow.")


def run_app(app: Callable[[], Any]) -> None:
    """What every entry point (``clara``, and ``python -m clara.cli`` that torchrun launches) does around its app:
    the libraries quiet, a user's mistake that no command caught said by ``fail``, any other error raised."""
    quiet_libraries()
    try:
        app()
    except Exception as exc:  # noqa: BLE001 - sorted by user_error; the rest re-raised
        if not user_error(exc):
            raise
        fail(exc)


def fail(exc: BaseException) -> NoReturn:
    """The one way a user's mistake ends a command, whether the command caught it or ``clara``'s entry point did:
    ``error: <message>`` on one line of stderr (the message's lines joined), with how to see the traceback, and
    exit status 2. Under ``CLARA_DEBUG=1`` the error is raised as itself instead, traceback and all."""
    if os.environ.get("CLARA_DEBUG"):
        raise exc
    message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    typer.secho(f"error: {message} (CLARA_DEBUG=1 shows the traceback)", fg=typer.colors.RED, err=True)
    raise SystemExit(2)  # not typer.Exit: the entry point calls this outside the app, where only SystemExit ends


def ingest(corpus: str, on_error: str, preset: str, max_doc_tokens: Optional[int], model_cfg=None):
    """Ingest a corpus the same way everywhere, so passage ids agree between synthesis, training, the store and
    evaluation: split with the tokenizer and document length of ``model_cfg`` (a checkpoint's) or the preset's."""
    from clara.config import preset as make_preset
    from clara.data.corpus import ingest_corpus

    return ingest_corpus(corpus, model_cfg or make_preset(preset), on_error=on_error, max_doc_tokens=max_doc_tokens)
