"""Shared fixtures: a tiny random model (hidden 64, 2 layers) and small data files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FIXTURES = Path(__file__).parent / "fixtures"


def perturb(model, seed: int = 0, scale: float = 0.2) -> None:
    """Give every adapter different non-zero LoRA B weights (fresh LoRA is the identity) and move the special rows,
    so that the three adapters and the base are distinguishable."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
        model.special.add_(torch.randn(model.special.shape, generator=gen) * 0.5)


@pytest.fixture
def tiny_model():
    from clara.config import preset
    from clara.model import ClaraModel

    model = ClaraModel.build(preset("tiny", compression_rate=16))
    perturb(model)
    return model


@pytest.fixture
def docs() -> list[str]:
    return [
        "Paris is the capital and largest city of France. It lies on the river Seine.",
        "The Nile is a major river in northeastern Africa. It flows north into the Mediterranean Sea, "
        "and its basin covers eleven countries. " * 3,
        "Python is a programming language.",
    ]


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    """A migrated engine on the real PostgreSQL + pgvector: $CLARA_DATABASE_URL, else an embedded server."""
    from clara.store.db import connect

    url = os.environ.get("CLARA_DATABASE_URL")
    if not url:
        from clara.store.server import embedded_server, sqlalchemy_url

        url = sqlalchemy_url(embedded_server(tmp_path_factory.mktemp("pg") / "data").get_uri())
    eng = connect(url)
    yield eng
    eng.dispose()
