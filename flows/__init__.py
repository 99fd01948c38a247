"""Prefect flows over the ``clara`` library (see ``flows/pipeline.py``)."""

import hashlib
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
"""The checkout this package runs from (its default project folder: DVC data, the wheel's sources)."""

PACKAGES = {"clara": "clara", "flows": "clara_flows", "infra": "clara_infra"}
"""What the project wheel holds: each folder of the checkout and the name it is installed under (pyproject.toml's
packages and package-dir; ``flows`` and ``infra`` are too generic to be top-level names in a user's environment)."""


def source_digest(project: Path = PROJECT) -> str:
    """The state of the project's sources: a hash of ``pyproject.toml`` and every file of ``PACKAGES`` (code,
    prompts, migrations). The project wheel is cached under it; the served deployment is restarted when it
    changes."""
    digest = hashlib.sha256()
    sources = sorted(p for pkg in PACKAGES for p in (project / pkg).rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts)
    for path in [project / "pyproject.toml", *sources]:
        digest.update(str(path.relative_to(project)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]
