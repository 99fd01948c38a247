"""The deployment's parameters, grouped: what Prefect's run form shows as six sections instead of 41 fields.

    prefect deployment run clara/full-pipeline --param profile=quality
    prefect deployment run clara/full-pipeline --param training='{"scp_steps": 0}' --param model='{"init_from": "ckpt"}'

A group given in part keeps the defaults of the rest. Budgets left ``None`` come from the profile
(``clara_flows.profiles``). A default that is also a library setting is read from the library's config dataclasses
(``clara.config``, ``clara.eval.gate.GateRule``), or, where that import would be heavy (``EvalConfig``), checked
against them by ``tests/test_defaults.py``. Field names are the ones the runs have always logged as MLflow params
(``flat``), so runs from before the grouping compare with runs after it.
"""

# No `from __future__ import annotations`: Prefect builds the run form from the evaluated annotations.
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict

from clara.config import E2EConfig, ModelConfig, SCPConfig
from clara.eval.gate import GateRule
from clara_flows.tracking import EXPERIMENT

_SCP, _INSTRUCT, _E2E = SCPConfig.for_stage("scp"), SCPConfig.for_stage("instruct"), E2EConfig()


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silently ignored value


class Data(_Group):
    """The corpus and how training data is synthesized from it."""
    corpus: str = "bundled"
    max_docs: Optional[int] = None
    teacher: Literal["natural", "extractive", "transformers", "openai"] = "natural"
    teacher_model: Optional[str] = None
    teacher_base_url: Optional[str] = None
    shards: int = 1
    dvc_push: bool = True


class Model(_Group):
    """The base model, the compression rate and where training starts."""
    preset: str = ModelConfig.base
    compression_rate: int = ModelConfig.compression_rate
    memory_readout: Literal["states", "vocab"] = ModelConfig.memory_readout
    init_from: Optional[str] = None
    device: Optional[str] = None


class Training(_Group):
    """Steps, batch sizes and learning rates of the three training stages."""
    scp_steps: Optional[int] = None
    scp_batch_size: Optional[int] = None
    scp_lr: float = _SCP.train.optim.lr
    scp_target_dropout: Optional[float] = None
    instruct_steps: Optional[int] = None
    instruct_batch_size: Optional[int] = None
    instruct_lr: float = _INSTRUCT.train.optim.lr
    instruct_freeze_compressor: bool = _INSTRUCT.freeze_compressor
    """Stage 2 trains the generator alone (``clara.config.SCPConfig.freeze_compressor``): left free, the compressor
    gives back part of what SCP taught it to carry (docs/memory.md)."""
    instruct_compressor_lr_scale: float = _INSTRUCT.compressor_lr_scale
    """With ``instruct_freeze_compressor`` off: the compressor's fraction of ``instruct_lr``
    (``SCPConfig.compressor_lr_scale``; 0.1 beat a frozen compressor in docs/memory.md, at twice the step time)."""
    e2e_steps: Optional[int] = None
    e2e_batch_size: Optional[int] = None
    e2e_lr: float = _E2E.train.optim.lr
    train_processes: int = 1
    """> 1: the three training stages run under ``torchrun``, one process per GPU (data parallel: each stage's
    batch size is the global batch and must divide among the processes)."""


class Evaluation(_Group):
    """Retrieval settings (used by evaluation and by the registered model) and what is compared."""
    top_k: int = _E2E.top_k
    n_candidates: int = _E2E.n_candidates
    retrieval_mode: Literal["clara", "dense", "lexical", "hybrid"] = "hybrid"
    retrieval_fuse: float = 2.0
    retrieval_rerank: Literal["auto", "always", "never"] = "auto"
    """When the query reasoner re-ranks the first stage (``clara.retrieval.rerank.use_rerank``; ``auto``: only
    when E2E trained it)."""
    eval_questions: Optional[int] = None
    baselines: str = "bm25"
    """Fewer than ``clara evaluate``'s ``bm25,minilm`` (``EvalConfig.baselines``): the gate needs one raw-text
    reference, and each baseline is one more generation pass over the questions."""


class Gate(_Group):
    """Which registered model the run produces and when it becomes ``production``."""
    model_name: str = "clara"
    gate_metric: str = "f1"
    gate_margin: float = GateRule.margin
    gate_max_latency_regression: float = GateRule.max_latency_regression


class Execution(_Group):
    """Where the work runs and is recorded."""
    dask_address: Optional[str] = None
    dask_workers: int = 0
    experiment: str = EXPERIMENT
    project_dir: Optional[str] = None
    refresh_cache: bool = False


GROUPS: dict[str, type[_Group]] = {"data": Data, "model": Model, "training": Training, "evaluation": Evaluation,
                                   "gate": Gate, "execution": Execution}


def flat(groups: dict[str, Any]) -> dict[str, Any]:
    """The groups' fields as one dict (the names MLflow logs). Accepts models or plain dicts."""
    out: dict[str, Any] = {}
    for name, cls in GROUPS.items():
        value = groups.get(name)
        model = value if isinstance(value, cls) else cls(**(value or {}))
        out.update(model.model_dump())
    return out


def grouped(**fields: Any) -> dict[str, Any]:
    """Flat field names into the flow's keyword arguments (``profile`` passes through): what a script or a test
    holding flat settings calls the flow with. An unknown name is an error."""
    owner = {f: g for g, cls in GROUPS.items() for f in cls.model_fields}
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key == "profile":
            out[key] = value
        elif key in owner:
            out.setdefault(owner[key], {})[key] = value
        else:
            raise ValueError(f"unknown pipeline parameter {key!r}")
    return {k: (GROUPS[k](**v) if k in GROUPS else v) for k, v in out.items()}
