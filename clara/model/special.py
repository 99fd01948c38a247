"""The special tokens: ``<MEM0>…<MEM{n-1}>``, ``<ENC>``, ``<SEP>`` and, for target dropout with a learned mask
(``ModelConfig.dropout_mask``), ``<MASK>``. They get consecutive ids after the base's vocabulary; their rows live in
``ClaraModel.special``, not in the base's embedding matrix (``clara.model.clara_model``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from clara.config import ModelConfig
from clara.model.memory import initial_special_rows, mem_token

if TYPE_CHECKING:
    from clara.model.clara_model import ClaraModel

ENC_TOKEN = "<ENC>"
SEP_TOKEN = "<SEP>"
MASK_TOKEN = "<MASK>"
"""What target dropout feeds for a dropped response token with ``ModelConfig.dropout_mask = "learned"``."""


def special_tokens(cfg: ModelConfig) -> list[str]:
    """The special tokens of a model with ``cfg``, in id order."""
    return [mem_token(i) for i in range(cfg.n_mem_max)] + [ENC_TOKEN, SEP_TOKEN] + (
        [MASK_TOKEN] if cfg.dropout_mask == "learned" else [])


def register(tokenizer, tokens: Sequence[str], first: int | None = None) -> int:
    """Add ``tokens`` to ``tokenizer``; they must get consecutive ids (starting at ``first`` when given), since the
    model finds a special token's row by its id's offset. Returns the first id."""
    tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)}, replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    start = ids[0] if first is None else first
    if ids != list(range(start, start + len(ids))):
        raise RuntimeError(f"special tokens {list(tokens)} did not get consecutive ids from {start}: {ids}")
    return ids[0]


def continue_with(model: ClaraModel, cfg: ModelConfig) -> None:
    """``model`` runs on with ``cfg`` (``clara.config.init_model_config``: what a continuing run may change). A model
    built without the ``<MASK>`` row that ``dropout_mask = "learned"`` asks for gains it, started at the mean
    embedding plus noise (``memory_init = "mean"``, whatever the config says: a single row has nothing to be
    orthogonal to); the other rows and every adapter stay as trained."""
    model.cfg = cfg
    if cfg.dropout_mask != "learned" or MASK_TOKEN in model.special_tokens:
        return
    register(model.tokenizer, [MASK_TOKEN], model.first_special_id + len(model.special_tokens))
    model.special_tokens.append(MASK_TOKEN)
    emb = model.input_embeddings.weight.detach().float().cpu()
    row = initial_special_rows(emb, 1, "mean", cfg.seed).to(model.special.device)
    model.special = nn.Parameter(torch.cat([model.special.detach(), row]), requires_grad=model.special.requires_grad)


def dropout_id(model: ClaraModel) -> int:
    """What target dropout feeds for a dropped response token (``ModelConfig.dropout_mask``)."""
    if model.cfg.dropout_mask == "learned":
        return model.first_special_id + model.special_tokens.index(MASK_TOKEN)
    return model.tokenizer.pad_token_id
