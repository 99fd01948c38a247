"""The ``clara`` command: the library's commands (``clara.cli``) plus those that need the tracking server —
promote, rollback, models, ask — and MLflow model URIs (``models:/clara@production``) wherever a command takes
a model. The library itself never imports MLflow: the URI resolver is handed to its commands here."""

from __future__ import annotations

import json
import os
from typing import Optional

import typer

registry_app = typer.Typer()
ModelNameOpt = typer.Option("clara", "--name", help="Registered model name.")


def _registry_call(fn, *args):
    from mlflow.exceptions import MlflowException

    from clara.cli import fail
    from clara_flows import tracking
    from clara_flows.registry import RegistryError

    try:
        return fn(tracking.client(), *args)
    except (RegistryError, MlflowException) as exc:
        why = tracking.outage(exc)  # a server that does not answer is said as that, not as the registry's refusal
        fail(tracking.TrackingUnavailable(why) if why else exc)


def _say(decision) -> None:
    typer.echo(f"{decision.name} v{decision.version} -> {decision.alias} "
               f"(was v{decision.previous or '-'}): {decision.reason}")


@registry_app.command("promote")
def promote_cmd(version: str = typer.Option(..., "--version", help="Model version to make production."),
                reason: str = typer.Option(..., help="Why (recorded on the version and in the history)."),
                name: str = ModelNameOpt) -> None:
    """Point the alias ``production`` at a version by hand (bypassing the pipeline's gate)."""
    from clara_flows.registry import promote

    _say(_registry_call(promote, name, version, reason))


@registry_app.command("rollback")
def rollback_cmd(reason: str = typer.Option(..., help="Why (recorded)."), name: str = ModelNameOpt) -> None:
    """Move ``production`` back to the version that held it before the current one."""
    from clara_flows.registry import rollback

    _say(_registry_call(rollback, name, reason))


@registry_app.command("models")
def models_cmd(name: str = ModelNameOpt,
               metric: str = typer.Option("f1", help="Evaluation metric to show.")) -> None:
    """List a registered model's versions with their aliases, metric and gate decision."""
    from clara.cli import fail
    from clara_flows import tracking

    def show(c, name):
        versions = sorted(c.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
        if not versions:
            raise FileNotFoundError(f"no versions of {name!r} at {tracking.tracking_uri()}")
        by_version: dict[str, list[str]] = {}
        for alias, ver in c.get_registered_model(name).aliases.items():
            by_version.setdefault(str(ver), []).append(alias)
        for v in versions:
            aliases = ",".join(sorted(by_version.get(str(v.version), []))) or "-"
            typer.echo(f"v{v.version:<4} {aliases:<22} {metric} {v.tags.get('eval.' + metric, '-'):<10} "
                       f"data {v.tags.get('data_version', '-')[:12]:<12} build {v.tags.get('build_id', '-'):<5} "
                       f"{v.tags.get('production.reason') or v.tags.get('gate.reason', '')}")

    try:
        _registry_call(show, name)
    except FileNotFoundError as exc:
        fail(exc)


@registry_app.command("ask")
def ask_cmd(question: list[str] = typer.Argument(..., help="One or more questions."),
            model: str = typer.Option("models:/clara@production", help="MLflow model URI."),
            k: Optional[int] = typer.Option(None, min=1, help="Documents to retrieve (default: the model's)."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON lines.")) -> None:
    """Answer from the production model: retrieval from pgvector, generation from the memory tokens."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from clara.cli import fail
    from clara.store.builds import StoreError
    from clara_flows import tracking

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(tracking.tracking_uri())
    try:
        # from the cache folder, downloaded once per model version (loading the URI itself leaves a temp copy)
        m = mlflow.pyfunc.load_model(str(tracking.download_model(model)))
        out = m.predict(pd.DataFrame({"question": question}), params={"k": k} if k is not None else None)
    except (MlflowException, StoreError, ValueError, OSError) as exc:
        fail(exc)
    for row in out.to_dict("records"):
        if as_json:
            typer.echo(json.dumps(row))
            continue
        typer.echo(f"Q: {row['question']}\nA: {row['answer']}")
        for title, doc_id, score in zip(row["titles"], row["doc_ids"], row["scores"]):
            typer.echo(f"   {score:.3f}  {title}  [{doc_id}]")


def build_app() -> typer.Typer:
    """The full ``clara`` command: a new Typer holding the library's commands and groups and the registry's."""
    from clara import cli

    app = typer.Typer(help=cli.app.info.help, no_args_is_help=True)
    app.registered_commands = [*cli.app.registered_commands, *registry_app.registered_commands]
    app.registered_groups = list(cli.app.registered_groups)
    return app


def context() -> dict:
    """What the library's commands are handed: MLflow's model-URI resolver."""
    from clara_flows import tracking

    return {"resolve_uri": tracking.download_model}


def main() -> None:
    from clara.cli import run_app

    run_app(lambda: build_app()(obj=context(), standalone_mode=True))


if __name__ == "__main__":
    main()
