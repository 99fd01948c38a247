"""Checkpoints: safetensors and JSON only, so loading one never unpickles anything.

Layout of a checkpoint folder::

    clara.json                          format, model config (names the base and the rate), special tokens, extras
    adapters/<name>/adapter_config.json  a standard PEFT adapter folder per adapter
    adapters/<name>/adapter_model.safetensors
    special_embeddings.safetensors      the trained rows of <MEM0>…, <ENC>, <SEP>
    base/                               only for a base that cannot be rebuilt from a path (``tiny``):
                                        config.json, model.safetensors, tokenizer files

A checkpoint saved on one device loads on any other: tensors are stored on the CPU and the device and dtype
are chosen at load time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file

from clara.atomic import written_atomically
from clara.config import ModelConfig, from_dict, to_dict
from clara.model.clara_model import ADAPTERS, ClaraModel

FORMAT = "clara-checkpoint/1"
CONFIG_FILE = "clara.json"


def save_checkpoint(model: ClaraModel, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``path`` atomically (a temporary sibling folder renamed into place)."""
    from peft import get_peft_model_state_dict

    path = Path(path)
    with written_atomically(path, CONFIG_FILE) as tmp:
        for name in ADAPTERS:
            folder = tmp / "adapters" / name
            folder.mkdir(parents=True)
            state = get_peft_model_state_dict(model.peft, adapter_name=name)
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                      folder / "adapter_model.safetensors")
            model.peft.peft_config[name].save_pretrained(folder)
        save_file({"special": model.special.detach().cpu().float().contiguous()},
                  tmp / "special_embeddings.safetensors")
        if model.cfg.base == "tiny":
            _save_base(model, tmp / "base")
        meta = {
            "format": FORMAT,
            "model": to_dict(model.cfg),
            "special_tokens": model.special_tokens,
            "first_special_id": model.first_special_id,
            "base_included": model.cfg.base == "tiny",
            "extra": extra or {},
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return path


def release_notes(pairs: Sequence[str]) -> dict[str, str]:
    """``--note KEY=VALUE`` strings as the entries a release records in its ``clara.json`` (``export_release``'s
    ``extra``: where it came from, what was held out).

    Raises:
        ValueError: a note without ``=``.
    """
    bad = [n for n in pairs if "=" not in n]
    if bad:
        raise ValueError(f"--note takes KEY=VALUE, got {bad[0]!r}")
    return dict(n.split("=", 1) for n in pairs)


def export_release(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.bfloat16,
                   extra: dict[str, Any] | None = None) -> Path:
    """Copy checkpoint ``src`` to ``dst`` with the adapter weights cast to ``dtype`` (bf16 halves a release;
    loading casts them back into the model's own dtype). The special rows stay fp32 (a few KB).

    ``extra`` is merged into the checkpoint's ``extra`` (a release records where it came from)."""
    src, dst = resolve_checkpoint(src), Path(dst)
    meta = read_checkpoint_config(src)
    with written_atomically(dst, CONFIG_FILE) as tmp:
        for name in ADAPTERS:
            folder = tmp / "adapters" / name
            folder.mkdir(parents=True)
            state = read_safetensors(src / "adapters" / name / "adapter_model.safetensors")
            save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, folder / "adapter_model.safetensors")
            shutil.copy2(src / "adapters" / name / "adapter_config.json", folder / "adapter_config.json")
        shutil.copy2(src / "special_embeddings.safetensors", tmp / "special_embeddings.safetensors")
        if meta.get("base_included"):
            shutil.copytree(src / "base", tmp / "base")
        meta["extra"] = {**meta.get("extra", {}), **(extra or {}), "adapter_dtype": str(dtype).removeprefix("torch.")}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return dst


def _save_base(model: ClaraModel, folder: Path) -> None:
    """The frozen base weights without the LoRA layers, as a plain transformers folder."""
    folder.mkdir(parents=True)
    state = {}
    for k, v in model.base_model.state_dict().items():
        if "lora_" in k:
            continue
        state[k.replace(".base_layer.", ".")] = v.detach().cpu().contiguous()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    model.base_model.config.save_pretrained(folder)
    # The tokenizer is saved without our special tokens: they are added again, in order, on load.
    base_tok = model.tokenizer.__class__(tokenizer_object=model.tokenizer.backend_tokenizer)
    base_tok.save_pretrained(folder)
    _strip_added_tokens(folder, model.first_special_id)


def _strip_added_tokens(folder: Path, first_special_id: int) -> None:
    tok_file = folder / "tokenizer.json"
    data = json.loads(tok_file.read_text(encoding="utf-8"))
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < first_special_id]
    tok_file.write_text(json.dumps(data), encoding="utf-8")
    cfg_file = folder / "tokenizer_config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        cfg.pop("extra_special_tokens", None)
        cfg.pop("additional_special_tokens", None)
        cfg["added_tokens_decoder"] = {k: v for k, v in cfg.get("added_tokens_decoder", {}).items()
                                       if int(k) < first_special_id}
        cfg.setdefault("pad_token", "<pad>")
        cfg.setdefault("eos_token", "</s>")
        cfg.setdefault("bos_token", "<s>")
        cfg_file.write_text(json.dumps(cfg, indent=2), encoding="utf-8")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a training run folder whose final checkpoint is ``model/``."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() and (path / "model" / CONFIG_FILE).is_file():
        return path / "model"
    return path


def checkpoint_digest(path: str | Path) -> str:
    """A digest of what a checkpoint holds (its model config and every weight file), for a cache key that must
    change when a checkpoint is replaced in place under the same path (a release)."""
    import hashlib

    path = resolve_checkpoint(path)
    digest = hashlib.sha256(json.dumps(read_checkpoint_config(path)["model"], sort_keys=True).encode())
    for file in sorted(path.rglob("*.safetensors")):
        digest.update(file.relative_to(path).as_posix().encode())
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    path = resolve_checkpoint(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a clara checkpoint (no {CONFIG_FILE})")
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg_file}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{cfg_file}: unsupported checkpoint format {found!r} (expected {FORMAT})")
    if not isinstance(meta.get("model"), dict):
        raise ValueError(f"{cfg_file}: no 'model' table")
    try:  # a config that could not build a model is refused here, not half-way through a load
        from_dict(ModelConfig, dict(meta["model"]))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{cfg_file}: bad model config: {exc}") from exc
    return meta


def load_checkpoint(path: str | Path, device: str | None = None, dtype: str | None = None,
                    base: str | None = None) -> ClaraModel:
    """Load a checkpoint written by ``save_checkpoint``.

    Args:
        device / dtype: override where and how to load (default: the saved config, i.e. ``auto``).
        base: load the adapters onto this base instead of the one recorded (e.g. a local copy of a hub model).
    """
    path = resolve_checkpoint(path)
    meta = read_checkpoint_config(path)
    model_cfg = meta["model"]
    if device is not None:
        model_cfg["device"] = device
    if dtype is not None:
        model_cfg["dtype"] = dtype
    if base is not None:
        model_cfg["base"] = base
    cfg = from_dict(ModelConfig, model_cfg)
    special = read_safetensors(path / "special_embeddings.safetensors")["special"]
    base_dir = path / "base" if meta.get("base_included") and base is None else None
    model = ClaraModel.build(cfg, special=special, base_dir=base_dir)
    if model.special_tokens != meta["special_tokens"] or model.first_special_id != meta["first_special_id"]:
        raise ValueError(
            f"{path}: the tokenizer of base {cfg.base!r} gives the special tokens different ids than at save time "
            f"({model.first_special_id} vs {meta['first_special_id']}); is this the same base model?"
        )
    load_adapter_weights(model, path)
    return model


def read_safetensors(file: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a missing, truncated or corrupt file is a ValueError naming it."""
    from safetensors import SafetensorError

    if not file.is_file():
        raise FileNotFoundError(f"missing {file}")
    try:
        return load_file(file, device=device)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{file}: unreadable safetensors file (truncated or corrupt): {exc}") from None


def load_adapter_weights(model: ClaraModel, path: str | Path) -> None:
    """Load every adapter's weights and the special rows from checkpoint ``path`` into ``model`` in place."""
    from peft import set_peft_model_state_dict

    path = Path(path)
    for name in ADAPTERS:
        file = path / "adapters" / name / "adapter_model.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"{path}: missing adapter weights {file.relative_to(path)}")
        state = read_safetensors(file, device=str(model.device))
        result = set_peft_model_state_dict(model.peft, state, adapter_name=name)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"{file}: weights that fit no layer of this base: {unexpected[:5]}")
    special = read_safetensors(path / "special_embeddings.safetensors")["special"]
    with torch.no_grad():
        model.special.copy_(special.to(model.special.device))


def average_checkpoints(paths: Sequence[str | Path], out: str | Path,
                        weights: Sequence[float] | None = None) -> dict[str, float]:
    """Write to ``out`` the weighted average of checkpoints of one model (a weight-space ensemble of runs that share
    an ancestor), and return, per adapter, the relative Frobenius error of the rank-r refactoring.

    A LoRA layer is the product ``B @ A``; averaging A and B separately would add cross terms ``B_i @ A_j``, so
    the products are averaged and the average is factored back to the adapter's rank by SVD (its singular values
    split evenly between the two factors). The special rows are averaged as they are. The checkpoints must agree on
    the model config (device and precision aside), the special tokens and each adapter's config.

    Raises:
        ValueError: fewer than two checkpoints, weights that do not match them, checkpoints of different models,
            an unreadable weight file, or an ``out`` that is a folder but not a checkpoint (nothing is written).
        FileNotFoundError: a checkpoint without ``clara.json`` or one of its weight files.
    """
    import math

    paths = [resolve_checkpoint(p) for p in paths]
    if len(paths) < 2:
        raise ValueError(f"averaging needs at least two checkpoints, got {len(paths)}")
    weights = [1.0 / len(paths)] * len(paths) if weights is None else [float(w) for w in weights]
    if (len(weights) != len(paths) or not all(math.isfinite(w) and w >= 0 for w in weights)
            or abs(sum(weights) - 1.0) > 1e-6):
        raise ValueError(f"weights must be {len(paths)} non-negative numbers summing to 1, got {weights}")
    metas = [read_checkpoint_config(p) for p in paths]
    same = ("model", "special_tokens", "first_special_id", "base_included")

    def shape(meta: dict[str, Any]) -> dict[str, Any]:
        return {k: ({**meta[k], "device": None, "dtype": None, "amp": None} if k == "model" else meta.get(k))
                for k in same}

    for p, m in zip(paths[1:], metas[1:]):
        if shape(m) != shape(metas[0]):
            raise ValueError(f"{p} is not a checkpoint of the same model as {paths[0]} (model config, special "
                             f"tokens or base differ)")
    residual = {}
    with written_atomically(Path(out), CONFIG_FILE) as tmp:
        for name in ADAPTERS:
            configs = [_adapter_config(p / "adapters" / name / "adapter_config.json") for p in paths]
            if any(c != configs[0] for c in configs[1:]):
                raise ValueError(f"the {name} adapters of {[str(p) for p in paths]} have different configs")
            states = [read_safetensors(p / "adapters" / name / "adapter_model.safetensors") for p in paths]
            averaged, residual[name] = _average_lora(states, weights, name)
            folder = tmp / "adapters" / name
            folder.mkdir(parents=True)
            save_file(averaged, folder / "adapter_model.safetensors")
            shutil.copy2(paths[0] / "adapters" / name / "adapter_config.json", folder / "adapter_config.json")
        special = sum(w * read_safetensors(p / "special_embeddings.safetensors")["special"].float()
                      for w, p in zip(weights, paths))
        save_file({"special": special.contiguous()}, tmp / "special_embeddings.safetensors")
        if metas[0].get("base_included"):
            shutil.copytree(paths[0] / "base", tmp / "base")
        meta = dict(metas[0])
        # each input's own record of the stages behind it, where it keeps one (a release's ``lineage``, or what an
        # input that is itself an average was made of)
        meta["extra"] = {"averaged_from": [{"path": str(p), "digest": checkpoint_digest(p), "weight": w,
                                            **{k: m.get("extra", {}).get(k)
                                               for k in ("stage", "lineage", "averaged_from")}}
                                           for p, w, m in zip(paths, weights, metas)],
                         "average_residual": residual}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return residual


_WEIGHT_SHAPING = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
                   "bias", "fan_in_fan_out", "modules_to_save", "layers_to_transform", "peft_type")


def _adapter_config(file: Path) -> dict[str, Any]:
    """What of an adapter's PEFT config shapes its weights or their scale, the target modules sorted (PEFT writes
    that set in any order); keys that only name a PEFT version or a feature left off are not compared."""
    cfg = json.loads(file.read_text(encoding="utf-8"))
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    return {k: cfg.get(k) for k in _WEIGHT_SHAPING}


def _average_lora(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float],
                  name: str) -> tuple[dict[str, torch.Tensor], float]:
    """The weighted average of LoRA state dicts as factors of each layer's own rank, and the relative Frobenius
    error of that refactoring over all layers (0 when each layer's averaged product has at most that rank)."""
    keys = sorted(states[0])
    if any(sorted(s) != keys for s in states[1:]):
        raise ValueError(f"the {name} adapters hold different layers")
    if all(torch.equal(s[k], states[0][k]) for s in states[1:] for k in keys):
        # an adapter no run changed (a query reasoner before E2E): copied bit for bit rather than refactored into
        # other factors of the same product
        return {k: v.float().contiguous() for k, v in states[0].items()}, 0.0
    out: dict[str, torch.Tensor] = {}
    lost = total = 0.0
    for a_key in (k for k in keys if ".lora_A." in k):
        b_key = a_key.replace(".lora_A.", ".lora_B.")
        if b_key not in states[0]:
            raise ValueError(f"the {name} adapter has {a_key} without its {b_key}")
        # sum_i w_i B_i A_i = [w_1 B_1 … w_n B_n] @ [A_1; …; A_n]: its SVD from the QR factors of the two
        # stacks and the SVD of their small (n·r)² core, not of the full out × in product
        qb, rb = torch.linalg.qr(torch.cat([w * s[b_key].double() for w, s in zip(weights, states)], dim=1))
        qa, ra = torch.linalg.qr(torch.cat([s[a_key].double() for s in states], dim=0).T)
        u, sv, vh = torch.linalg.svd(rb @ ra.T)
        rank = states[0][a_key].shape[0]
        # singular values at rounding level of the inputs' own products count as zero
        scale = sum(w * float(s[b_key].double().norm() * s[a_key].double().norm()) for w, s in zip(weights, states))
        kept = min(rank, int((sv > scale * 1e-9).sum()))
        root = sv[:kept].sqrt()
        # a direction the average does not use (its rank is below the layer's) gets B = 0 and the first input's
        # A row, as a fresh LoRA has: the product is the same, and a later run can still train it (zero in both
        # factors, neither would ever get a gradient)
        b = torch.zeros_like(states[0][b_key], dtype=torch.float32)
        a = states[0][a_key].float().clone()
        b[:, :kept] = ((qb @ u[:, :kept]) * root).float()
        a[:kept] = (root[:, None] * (qa @ vh[:kept].T).T).float()
        out[b_key], out[a_key] = b.contiguous(), a.contiguous()
        lost += float(sv[kept:].pow(2).sum())
        total += float(sv.pow(2).sum())
    rest = [k for k in keys if ".lora_A." not in k and ".lora_B." not in k]
    if rest:
        raise ValueError(f"the {name} adapter holds weights other than LoRA factors: {rest[:3]}")
    return out, (lost / total) ** 0.5 if total > 0 else 0.0
