"""The commands in README.md and docs/*.md run as written, as far as that is cheap to check.

From every fenced ```bash block (continuation lines and quotes spanning lines joined, comments dropped, ``&&`` /
``;`` / ``|`` split):

- each ``--help`` form (``clara … --help``, ``.venv/bin/clara … --help``, ``python benchmarks/<x>.py --help``) is
  run as a process, with ``.venv/bin`` first on ``PATH`` (so ``clara`` and ``python`` are the project's), the
  repository root as working directory and ``HF_HUB_OFFLINE=1``, and must exit 0;
- each ``clara <group> <command>`` / ``clara <command>`` line names a command that exists, and every ``--option`` it
  passes is one that command declares: checked on ``clara <path> --help``, invoked once per distinct path through
  the application object the ``clara`` script runs (``clara_flows.cli.build_app``), in this process;
- each ``python benchmarks/<x>.py`` line names a script that exists and passes only options its ``--help`` lists;
- each ``prefect deployment run`` line names the deployment this project serves, and each ``--param`` there (and
  in ``make pipeline PARAMS="…"``) is ``profile=<a profile>`` or ``<group>='<JSON object>'`` whose fields the
  group's model in ``clara_flows.params`` accepts; ``make <target>`` names a Makefile target.

Inline code spans holding ``--param`` are checked the same way. Every relative link (and its ``#anchor``) points to
a file (and heading) that exists, and README.md is at most 250 lines.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250
SEPARATORS = {"&&", "||", ";", "|"}
PROGRAMS = {".venv/bin/clara": "clara", ".venv/bin/python": "python", ".venv/bin/prefect": "prefect",
            "python3": "python", ".venv/bin/mlflow": "mlflow"}


# ------------------------------------------------------------------------------------------ extraction

def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _fenced(text: str, lang: str | None = None) -> list[str]:
    """The bodies of fenced blocks (of language ``lang``, or all)."""
    out = []
    for m in re.finditer(r"^```([\w-]*)[^\n]*\n(.*?)^```", text, re.M | re.S):
        if lang is None or m.group(1) == lang:
            out.append(m.group(2))
    return out


def _without_fences(text: str) -> str:
    """The text with every fenced block (fences included) removed."""
    return re.sub(r"^```[^\n]*\n.*?^```[^\n]*$", "", text, flags=re.M | re.S)


def _logical_lines(block: str) -> list[str]:
    """Shell lines with backslash continuations and newlines inside quotes joined."""
    lines, pending = [], ""
    for raw in block.splitlines():
        if not pending and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        candidate = pending + raw
        try:
            shlex.split(candidate, comments=True)
        except ValueError:  # a quote spans lines
            pending = candidate + "\n"
            continue
        lines.append(candidate.strip())
        pending = ""
    assert not pending, f"unterminated command: {pending!r}"
    return lines


def _simple_commands(line: str) -> list[list[str]]:
    """A line's commands as word lists, split at && ; | and without leading VAR=value assignments."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words, out = list(lexer), []
    current: list[str] = []
    for w in words + [";"]:
        if w in SEPARATORS or set(w) <= set(";&|"):
            while current and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", current[0]):
                current.pop(0)
            if current:
                current[0] = PROGRAMS.get(current[0], current[0])
                out.append(current)
            current = []
        else:
            current.append(w)
    return out


@lru_cache(maxsize=None)
def _page_commands() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(page, words) for every command in every page's bash blocks."""
    found = []
    for page in PAGES:
        for block in _fenced(page.read_text(encoding="utf-8"), "bash"):
            for line in _logical_lines(block):
                for words in _simple_commands(line):
                    found.append((_rel(page), tuple(words)))
    return tuple(found)


def _inline_param_spans() -> list[tuple[str, list[str]]]:
    """Inline code spans that pass deployment parameters, as word lists."""
    out = []
    for page in PAGES:
        text = _without_fences(page.read_text(encoding="utf-8"))
        for m in re.finditer(r"`([^`]+)`", text):
            span = " ".join(m.group(1).split())
            if "--param " not in span:
                continue
            for words in _simple_commands(span):
                out.append((_rel(page), words))
    return out


# ------------------------------------------------------------------------------------------- running

def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("VIRTUAL_ENV", None)
    return env


@lru_cache(maxsize=None)
def _run(words: tuple[str, ...]) -> subprocess.CompletedProcess:
    program = words[0]
    resolved = VENV_BIN / program if (VENV_BIN / program).exists() else program
    return subprocess.run([str(resolved), *words[1:]], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)


@lru_cache(maxsize=None)
def _clara_app():
    from clara_flows.cli import build_app

    return build_app()


@lru_cache(maxsize=None)
def _clara_help(path: tuple[str, ...]) -> tuple[int, str]:
    """``clara <path> --help`` through the app the ``clara`` script runs: exit code and text."""
    from typer.testing import CliRunner

    from clara_flows.cli import context

    res = CliRunner().invoke(_clara_app(), [*path, "--help"], obj=context(), terminal_width=250)
    return res.exit_code, res.output


def _clara_path(args: list[str]) -> tuple[str, ...]:
    """The command path at the start of a ``clara`` command's arguments: (group, command), (command,) or ()."""
    groups = {g.name for g in _clara_app().registered_groups}
    if not args or args[0].startswith("-"):
        return ()
    if args[0] in groups:
        return tuple(args[:2]) if len(args) > 1 and not args[1].startswith("-") else (args[0],)
    return (args[0],)


def _options(words) -> set[str]:
    return {w.split("=", 1)[0] for w in words if w.startswith("--") and len(w) > 2}


def _is_benchmark(words) -> bool:
    return len(words) >= 2 and words[0] == "python" and words[1].startswith("benchmarks/") and \
        words[1].endswith(".py")


def _is_help_form(words) -> bool:
    return "--help" in words and (words[0] == "clara" or _is_benchmark(words))


# --------------------------------------------------------------------------------------- parameters

def _param_problems(params: list[str]) -> list[str]:
    """What is wrong with ``--param`` values (``KEY=VALUE`` strings)."""
    from pydantic import ValidationError

    from clara_flows import params as P
    from clara_flows.profiles import PROFILES

    problems = []
    for item in params:
        key, sep, value = item.partition("=")
        if not sep:
            problems.append(f"--param {item!r}: expected KEY=VALUE")
        elif key == "profile":
            if value not in PROFILES:
                problems.append(f"--param profile={value}: not one of {sorted(PROFILES)}")
        elif key in P.GROUPS:
            try:
                fields = json.loads(value)
            except json.JSONDecodeError as exc:
                problems.append(f"--param {key}: not JSON ({exc}): {value!r}")
                continue
            if not isinstance(fields, dict):
                problems.append(f"--param {key}: a group is a JSON object, got {value!r}")
                continue
            try:
                P.GROUPS[key](**fields)
            except ValidationError as exc:
                problems.append(f"--param {key}={value}: {exc.errors()[0]['msg']} "
                                f"({'.'.join(map(str, exc.errors()[0]['loc']))})")
        else:
            problems.append(f"--param {key}: not a parameter (profile or a group: {', '.join(P.GROUPS)})")
    return problems


def _params_of(words) -> list[str]:
    out = []
    for i, w in enumerate(words):
        if w == "--param" and i + 1 < len(words):
            out.append(words[i + 1])
        elif w.startswith("--param="):
            out.append(w[len("--param="):])
    return out


@lru_cache(maxsize=None)
def _deployment() -> str:
    from clara_flows.pipeline import full_pipeline

    m = re.search(r"\.serve\(\s*name=\"([^\"]+)\"", (ROOT / "flows" / "serve.py").read_text(encoding="utf-8"))
    assert m, "flows/serve.py: no .serve(name=...) found"
    return f"{full_pipeline.name}/{m.group(1)}"


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w-]*):", text, re.M))


def _deployment_problems(words) -> list[str]:
    """``prefect deployment run …`` and ``make … PARAMS="…"``: target names and parameters."""
    problems: list[str] = []
    if words[:3] == ("prefect", "deployment", "run"):
        if len(words) < 4 or words[3] != _deployment():
            problems.append(f"deployment {words[3] if len(words) > 3 else None!r}: this project serves "
                            f"{_deployment()!r}")
        problems += _param_problems(_params_of(words))
    elif words[0] == "make":
        targets = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
        problems += [f"make {t}: no such target" for t in targets if t not in _make_targets()]
        for w in words[1:]:
            if w.startswith("PARAMS="):
                problems += _param_problems(_params_of(shlex.split(w[len("PARAMS="):])))
    elif words[0] == "--param":
        problems += _param_problems(_params_of(words))
    return problems


# ------------------------------------------------------------------------------------------------ tests

def test_pages_have_commands():
    commands = _page_commands()
    assert any(w[0] == "clara" for _, w in commands)
    assert any(w[:3] == ("prefect", "deployment", "run") for _, w in commands)
    assert any(_is_help_form(w) for _, w in commands)


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}); move detail to docs/"


def test_help_forms_run():
    forms: dict[tuple[str, ...], str] = {}
    for page, words in _page_commands():
        if _is_help_form(words):
            forms.setdefault(words, page)
    assert forms
    failed = []
    for words, page in forms.items():
        proc = _run(words)
        if proc.returncode != 0:
            failed.append(f"{page}: `{shlex.join(words)}` exited {proc.returncode}: {proc.stderr[-500:]}")
    assert not failed, "\n".join(failed)


def test_clara_commands_exist_with_their_options():
    wrong = []
    for page, words in _page_commands():
        if words[0] != "clara":
            continue
        path = _clara_path(list(words[1:]))
        code, text = _clara_help(path)
        if code != 0:
            wrong.append(f"{page}: `clara {' '.join(path)}` is not a command ({text.strip()[-300:]})")
            continue
        unknown = sorted(o for o in _options(words) - {"--help"} if not re.search(re.escape(o) + r"(?![\w-])", text))
        if unknown:
            wrong.append(f"{page}: `clara {' '.join(path)}` has no option {', '.join(unknown)}")
    assert not wrong, "\n".join(wrong)


def test_benchmark_commands_name_real_scripts_and_options():
    wrong = []
    for page, words in _page_commands():
        if not _is_benchmark(words):
            continue
        script = ROOT / words[1]
        if not script.is_file():
            wrong.append(f"{page}: {words[1]} does not exist")
            continue
        used = _options(words) - {"--help"}
        if not used:
            continue
        # a script with subcommands (scp_chain.py train …) documents their options under `script sub --help`;
        # positional arguments before the first option are kept (argparse prints help before checking them)
        head = []
        for w in words[2:]:
            if w.startswith("-"):
                break
            head.append(w)
        proc = _run(("python", words[1], *head, "--help"))
        assert proc.returncode == 0, f"{words[1]} --help exited {proc.returncode}: {proc.stderr[-500:]}"
        unknown = sorted(o for o in used if not re.search(re.escape(o) + r"(?![\w-])", proc.stdout))
        if unknown:
            wrong.append(f"{page}: {words[1]} has no option {', '.join(unknown)}")
    assert not wrong, "\n".join(wrong)


def test_deployment_runs_and_parameters_are_valid():
    checked, wrong = 0, []
    candidates = [*_page_commands(), *((p, tuple(w)) for p, w in _inline_param_spans())]
    for page, words in candidates:
        if words[:3] == ("prefect", "deployment", "run") or words[0] in ("make", "--param"):
            checked += 1
            wrong += [f"{page}: `{shlex.join(words)}`: {p}" for p in _deployment_problems(words)]
    assert checked
    assert not wrong, "\n".join(wrong)


def test_parameter_check_refuses_what_the_flow_refuses():
    """The check above is only worth something if it refuses a flat field, a misspelt field and bad JSON."""
    assert _param_problems(["scp_steps=45"])
    assert _param_problems(['training={"scp_step": 45}'])
    assert _param_problems(["training={scp_steps: 45}"])
    assert _param_problems(["profile=fast"])
    assert not _param_problems(['training={"scp_steps": 45}', "profile=quality"])


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = _without_fences(page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        text = _without_fences(page.read_text(encoding="utf-8"))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{_rel(page)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{_rel(page)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
