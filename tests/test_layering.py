"""The library does not know about its orchestration: nothing under clara/ imports the flows (installed as
``clara_flows``), the services (``clara_infra``), prefect or mlflow (the `clara` command adds the registry commands
and MLflow URIs from flows/cli.py). And the wheel installs exactly the project's packages, under names of its own."""

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # tests/ -> the repository
FORBIDDEN = ("clara_flows", "clara_infra", "flows", "infra", "prefect", "mlflow")


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


@pytest.mark.parametrize("path", sorted((ROOT / "clara").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_imports_no_orchestration(path):
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}" for line, name in _imports(path)
           if name.split(".")[0] in FORBIDDEN]
    assert not bad, "\n".join(bad)


def test_the_check_sees_imports_inside_functions(tmp_path):
    # Most of our imports are deferred into functions: the check must look there too, or it could never fail.
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from clara_flows import tracking\n    import mlflow.pyfunc\n")
    assert [n for _, n in _imports(f)] == ["clara_flows", "mlflow.pyfunc"]


def test_the_clara_command_has_the_library_and_registry_commands():
    from clara_flows.cli import build_app

    names = {c.name for c in build_app().registered_commands}
    assert {"evaluate", "compress", "synthesize", "promote", "rollback", "models", "ask"} <= names
    groups = {g.name for g in build_app().registered_groups}
    assert {"train", "model", "data", "store"} <= groups


def test_model_uris_go_through_the_injected_resolver(tmp_path):
    from clara.eval.datasets import resolve_model

    with pytest.raises(ValueError, match="needs a resolver"):
        resolve_model("models:/clara@production")
    (tmp_path / "artifacts" / "checkpoint").mkdir(parents=True)
    (tmp_path / "artifacts" / "checkpoint" / "clara.json").write_text("{}")
    asked = []
    got = resolve_model("models:/clara@production", lambda uri: asked.append(uri) or tmp_path / "artifacts")
    assert got == tmp_path / "artifacts" / "checkpoint" and asked == ["models:/clara@production"]
    with pytest.raises(FileNotFoundError, match="no clara checkpoint"):
        resolve_model("runs:/abc/model", lambda uri: tmp_path / "artifacts" / "checkpoint" / "nothing")


def test_the_wheel_lists_every_package_under_its_installed_name():
    # flows/ and infra/ install as clara_flows and clara_infra (generic top-level names would clash with a user's
    # own `flows` or `infra`); the list in pyproject.toml is explicit, so a new subpackage must be added there.
    from clara_flows import PACKAGES

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = set()
    for top, name in PACKAGES.items():
        for init in (ROOT / top).rglob("__init__.py"):
            folders.add(".".join([name, *init.parent.relative_to(ROOT / top).parts]))
    assert set(tool["packages"]) == folders
    assert {name: tool.get("package-dir", {}).get(name, name) for name in PACKAGES.values()} == \
        {name: top for top, name in PACKAGES.items()}
    assert not {"flows", "infra"} & {n.split(".")[0] for n in tool["packages"]}
