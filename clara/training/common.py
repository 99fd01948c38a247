"""Pieces every training loop uses: the optimizer and schedule, data order, and resumable checkpoints.

Resumable state is written as safetensors (tensors) + JSON (everything else): a checkpoint never needs pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, NoReturn

import torch
from safetensors.torch import save_file

from clara.atomic import written_atomically
from clara.config import OptimSettings, TrainConfig, to_dict
from clara.data.corpus import atomic_write_lines
from clara.model.checkpoint import load_adapter_weights, read_checkpoint_config, read_safetensors, save_checkpoint
from clara.model.clara_model import ClaraModel

MetricsCallback = Callable[[int, dict[str, float]], None]
"""Called as ``callback(step, metrics)`` after every logged optimizer step (flows hand in MLflow here)."""


def warmup_cosine(total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup_ratio`` of the steps, then cosine down to ``min_lr_ratio``."""
    warmup = max(1, round(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimization(params: list[torch.nn.Parameter] | list[dict[str, Any]], optim: OptimSettings,
                       total_steps: int):
    """AdamW at ``optim.lr`` (a parameter group may set its own ``lr``) under the warm-up + cosine schedule, which
    scales every group's rate alike."""
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, optim.warmup_ratio, optim.min_lr_ratio)
    )
    return optimizer, scheduler


def optimizer_step(model: ClaraModel, optimizer, scheduler, train: TrainConfig, dist) -> float:
    """Average gradients across processes (a no-op in one), clip, step, advance the schedule; returns the
    gradient norm before clipping."""
    params = model.trainable_parameters()
    dist.average_gradients(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, train.optim.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def save_final(model: ClaraModel, final: Path, extra: dict[str, Any], steps: int, dist) -> Path:
    """Rank 0 writes the completed checkpoint; no rank returns before it exists."""
    if dist.main:
        save_checkpoint(model, final, extra={**extra, "completed": True, "step": steps})
    dist.barrier()
    return final


def total_steps(train: TrainConfig, n_examples: int) -> int:
    if train.max_steps > 0:
        return train.max_steps
    per_epoch = math.ceil(n_examples / (train.batch_size * train.grad_accum))
    return max(1, per_epoch * train.epochs)


def batch_indices(step: int, micro: int, train: TrainConfig, n_examples: int) -> list[int]:
    """Example indices of micro-batch ``micro`` of optimizer step ``step``.

    A pure function of (step, seed): every epoch is a seeded permutation, so a resumed run reads exactly the
    examples the uninterrupted run would have, with no state to save.
    """
    start = (step * train.grad_accum + micro) * train.batch_size
    out = []
    for g in range(start, start + train.batch_size):
        epoch, pos = divmod(g, n_examples)
        perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(train.seed * 100_003 + epoch))
        out.append(int(perm[pos]))
    return out


# --------------------------------------------------------------------------------------- train state (no pickle)

def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, kv in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(kv)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_train_state(folder: Path, optimizer, scheduler, step: int, extra: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, folder / "optimizer.safetensors")
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["torch_cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    save_file(rng, folder / "rng.safetensors")
    meta = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), "extra": extra}
    (folder / "trainer_state.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")


def read_train_meta(folder: Path) -> dict[str, Any]:
    """``trainer_state.json`` of a train-state folder; unreadable JSON is a ValueError naming the file."""
    file = folder / "trainer_state.json"
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: not valid JSON (truncated or corrupt): {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(meta).__name__}")
    return meta


def load_train_state(folder: Path, meta: dict[str, Any], optimizer, scheduler) -> None:
    """Load the train state in ``folder`` (``meta``: its ``read_train_meta``) into optimizer/scheduler/RNG."""
    tensors = read_safetensors(folder / "optimizer.safetensors")
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    rng = read_safetensors(folder / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available() and len(rng["torch_cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(rng["torch_cuda"]))


class Checkpointer:
    """Step checkpoints under ``out/checkpoints/step-NNNNNN`` (model + train state), written atomically.

    A folder only appears under its final name once complete, so a kill mid-write leaves the previous
    checkpoint intact and a half-written ``.tmp`` that the next save removes. A step is only ever rewritten when
    ``restore`` skipped it as unreadable; a kill during that rewrite can leave the unreadable one at ``.step-N.old``,
    which the next save of any step removes (nothing readable is lost).
    """

    def __init__(self, out_dir: str | Path, keep: int = 2):
        self.root = Path(out_dir) / "checkpoints"
        self.keep = max(1, keep)

    def steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        found = [re.fullmatch(r"step-(\d+)", p.name) for p in self.root.iterdir()]
        return sorted(int(m.group(1)) for m in found if m and (self.root / m.group(0) / "train_state").is_dir())

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.root / f"step-{steps[-1]:06d}" if steps else None

    def save(self, model: ClaraModel, optimizer, scheduler, step: int, extra: dict[str, Any]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{step:06d}"
        if final.is_dir() and not (final / "train_state").is_dir():  # ours, and unusable without it (steps() skips it)
            shutil.rmtree(final)
        with written_atomically(final, "train_state", "step checkpoint") as tmp:  # what steps() takes for a step folder
            save_checkpoint(model, tmp / "model", extra=extra)
            save_train_state(tmp / "train_state", optimizer, scheduler, step, extra)
        for stale in [*self.root.glob(".step-*.tmp"), *self.root.glob(".step-*.old")]:  # other steps' kill leftovers
            shutil.rmtree(stale, ignore_errors=True)
        for old in self.steps()[: -self.keep]:
            shutil.rmtree(self.root / f"step-{old:06d}", ignore_errors=True)
        return final

    def _loadable(self, stage: str, resume: bool, identity: dict[str, Any] | None):
        """The step checkpoints ``restore`` may load, newest first, as (step, folder, train meta): unreadable ones
        skipped with a warning, and the refusals ``restore`` documents raised at the first readable one."""
        steps = self.steps()
        if steps and not resume:
            raise ValueError(f"{self.root} holds step checkpoints of an earlier run (last: step {steps[-1]}); "
                             f"without resuming they would mix with this run's: use another output folder, or "
                             f"remove that one to start over")
        for step in reversed(steps):
            folder = self.root / f"step-{step:06d}"
            try:
                meta = read_train_meta(folder / "train_state")
                saved = meta.get("extra", {})
                if not isinstance(saved, dict):
                    raise ValueError(f"'extra' is a {type(saved).__name__}, not an object")
            except (ValueError, OSError) as exc:
                warnings.warn(f"{folder} is unreadable ({exc}); resuming from the checkpoint before it", stacklevel=3)
                continue
            if saved.get("stage", stage) != stage:  # another run's: refused, never loaded
                raise ValueError(f"{folder} is a step checkpoint of stage {saved['stage']!r}, not {stage!r}: this "
                                 f"output folder holds another run; use another one")
            if identity is not None:
                refuse_another_run(saved, identity, folder, self.root.parent)
            if identity is not None and step > identity["total_steps"]:  # fewer steps would label these weights
                raise ValueError(f"{folder} is past this run's {identity['total_steps']} steps: the run in "
                                 f"{self.root.parent} went further; give at least {step} steps, or another folder")
            yield step, folder, meta

    def check(self, *, stage: str, resume: bool = True, identity: dict[str, Any] | None = None) -> None:
        """``restore``'s refusals alone, loading nothing: for a run whose setup before ``restore`` is costly (E2E
        compresses its whole document pool), so that a folder it may not continue is said before that work. Its
        warnings are ``restore``'s to give."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = next(self._loadable(stage, resume, identity), None)
        if found is None and self.steps():
            self._none_readable()

    def _none_readable(self) -> NoReturn:
        raise ValueError(f"no readable step checkpoint under {self.root}: remove it to start over")

    def restore(self, model: ClaraModel, optimizer, scheduler, *, stage: str, resume: bool = True,
                identity: dict[str, Any] | None = None) -> int:
        """The step a run of ``stage`` starts from: 0 where there are no step checkpoints; else the latest readable
        one is loaded into model/optimizer/scheduler/RNG and its step returned. One that cannot be read (cut off
        when a disk filled) is skipped for the one before it, with a warning.

        Refused, with the reason: checkpoints of another stage (the folder is another run's), of other settings or
        data than ``identity`` (``run_identity``: continuing them would train something else), and
        ``resume=False`` where checkpoints exist: two runs' steps in one folder would let retention delete the new
        run's and a later resume continue the old one."""
        for step, folder, meta in self._loadable(stage, resume, identity):
            try:
                load_adapter_weights(model, folder / "model")
                load_train_state(folder / "train_state", meta, optimizer, scheduler)
            except (ValueError, OSError, KeyError) as exc:
                warnings.warn(f"{folder} is unreadable ({exc}); resuming from the checkpoint before it", stacklevel=2)
                continue
            return step
        if self.steps():
            self._none_readable()
        return 0


class MetricsLog:
    """Appends one JSON line per logged step to ``out/metrics.jsonl`` and forwards to the injected callback.

    On resume, lines from steps after the restored checkpoint (logged before a kill) are dropped so the file
    has exactly one line per step.
    """

    def __init__(self, out_dir: str | Path, callback: MetricsCallback | None, resume_step: int):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.callback = callback
        if self.path.exists():
            kept = [ln for ln in self.path.read_text(encoding="utf-8").splitlines() if _step_of(ln) <= resume_step]
            atomic_write_lines(self.path, kept)  # a kill mid-rewrite keeps the old file whole

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.callback is not None:
            self.callback(step, metrics)


def _step_of(line: str) -> float:
    """A metrics line's step; a line cut off by a kill or a full disk is not a step (+inf: dropped)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


CONTINUABLE = ("model.device", "model.dtype", "model.amp", "train.max_steps", "train.epochs",
               "train.checkpoint_every", "train.keep_checkpoints", "train.log_every")
"""Settings a run may change and still continue the checkpoints of its output folder: where it runs, how often it
saves and logs, and how long it goes on (extending a run). Any other change would train something else."""


def run_identity(cfg: Any, *data: Any, start: str | None = None) -> dict[str, Any]:
    """What a run records with its checkpoints to be told from another: its whole config, a digest of its data
    (records as dataclasses or JSON values, in order; a record's ``source``, the file and line it was read from,
    is left out: the same rows under another path are the same data) and ``start``, the ``checkpoint_digest`` of
    the checkpoint it continues (None from scratch)."""
    digest = hashlib.sha256()
    for part in data:
        for item in part:
            row = dataclasses.asdict(item) if dataclasses.is_dataclass(item) else item
            if isinstance(row, dict):
                row = {k: v for k, v in row.items() if k != "source"}
            digest.update(json.dumps(row, sort_keys=True).encode())
    return {"config": to_dict(cfg), "data": digest.hexdigest()[:16], **({"start": start} if start else {})}


def _flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in table.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def refuse_another_run(saved: dict[str, Any], identity: dict[str, Any], where: Path, run: Path) -> None:
    """Refuse to continue, or hand back as finished, a checkpoint trained with other settings or data than this
    run's ``identity`` (``run_identity``). Settings in ``CONTINUABLE`` may differ. A setting the checkpoint does
    not record was added to the code since, so the checkpoint was trained with its config class's default
    (``identity["defaults"]``, the class built with no arguments): new options default to the old behaviour.
    Without ``identity["defaults"]`` such a setting counts as unchanged.

    Raises:
        ValueError: naming each difference.
    """
    old, new = _flat(saved.get("config") or {}), _flat(identity["config"])
    before = _flat(identity.get("defaults") or {})
    changed = [f"{k} {old[k]!r} -> {new[k]!r}" for k in sorted(old.keys() & new.keys())
               if old[k] != new[k] and k not in CONTINUABLE]
    changed += [f"{k} (not recorded: trained as the default {before[k]!r}) -> {new[k]!r}" for k in
                sorted(new.keys() - old.keys()) if k in before and before[k] != new[k] and k not in CONTINUABLE]
    if "data" in saved and saved["data"] != identity["data"]:
        changed.append("the training data")
    if "data" in saved and saved.get("start") != identity.get("start"):  # (checkpoints that record data, start too)
        changed.append("the checkpoint it started from")
    if changed:
        raise ValueError(f"{where} was trained with other settings or data than this run's ({'; '.join(changed[:4])}"
                         f"{'; …' if len(changed) > 4 else ''}): continuing it would not train what was asked; use "
                         f"another output folder, or remove {run} to start over")


def run_finished(final: Path, stage: str, steps: int, identity: dict[str, Any]) -> bool:
    """Whether ``final`` is the completed checkpoint of this stage with this step budget (a rerun is a no-op).

    Raises:
        ValueError: it is, but trained with other settings or data (``refuse_another_run``): not what was asked.
    """
    try:
        extra = read_checkpoint_config(final)["extra"]
    except (FileNotFoundError, ValueError):
        return False
    if not (extra.get("completed") and extra.get("stage") == stage):
        return False
    refuse_another_run(extra, identity, final, final.parent)
    return extra.get("step") == steps
