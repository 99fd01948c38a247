"""One long SCP run that every stretch of work adds to, and its curve (docs/memory.md).

    python benchmarks/experiments/scp_chain.py train --data MIX/scp.jsonl [--config chain.json] [--steps 6000]
    python benchmarks/experiments/scp_chain.py measure [--parts an]
    python benchmarks/experiments/scp_chain.py curve

``train`` continues the run in ``$CLARA_CACHE_DIR/chain/run`` from its latest step checkpoint when it is there,
and otherwise starts it from the release (``--init``, default ``releases/clara-smollm2-r16``). It runs at a
constant learning rate after a short warm-up, so it can be stopped anywhere (kill it: at most
``checkpoint_every`` steps are lost) and continued later without a schedule to restart. The chain's settings
are written beside the run the first time and a later start with different ones is refused: a chain is one
recipe. Seeds differ per release generation, so a chain that restarts from a newer release reads the data in a
new order.

``measure`` probes the latest step checkpoint (``benchmarks/quality_probe.py`` parts a and n by default: slot
diversity, reconstruction, answer spans and the gold answer's likelihood, no generation) and appends one line
to ``chain/curve.jsonl`` with the cumulative SCP steps (the release's lineage plus this run's steps).
``curve`` prints that file as a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
DEFAULT_RELEASE = ROOT / "releases" / "clara-smollm2-r16"


def chain_dir(arg: Path | None) -> Path:
    from clara.model.base import cache_dir

    return arg if arg is not None else cache_dir() / "chain"


def lineage(checkpoint: Path) -> list[dict[str, Any]]:
    """The stages a checkpoint went through, oldest first: ``extra.lineage`` of its ``clara.json``; for a weight
    average of checkpoints that each record one, the one ``average`` entry that holds them (``_instruct_entry``)."""
    from clara.model.checkpoint import read_checkpoint_config

    return _recorded_lineage(read_checkpoint_config(checkpoint).get("extra", {})) or []


def _recorded_lineage(extra: dict[str, Any]) -> list[dict[str, Any]] | None:
    """``extra.lineage``; for an average (``extra.averaged_from``, also one nested in an average's inputs) whose
    inputs all record theirs, the one entry holding them; else None."""
    if extra.get("lineage"):
        return list(extra["lineage"])
    entry = _instruct_entry(extra, "", "unrecorded") if extra.get("averaged_from") else {}
    return [entry] if "parents" in entry else None


def scp_steps(stages: Sequence[dict[str, Any]]) -> int:
    """SCP steps in a lineage; an average counts those of the parent that had the most."""
    return sum(int(s["steps"]) if s.get("stage") == "scp" else
               max(scp_steps(p) for p in s["parents"]) if s.get("stage") == "average" and s.get("parents") else 0
               for s in stages)


def generations(stages: Sequence[dict[str, Any]]) -> int:
    """How many stages lie behind a lineage's end on its longest path (an average's parents counted in): a chain
    started from it draws its data order from this, so each release generation reads the data anew."""
    return sum(1 + max(generations(p) for p in s["parents"]) if s.get("parents") else 1 for s in stages)


def prior_scp_steps(checkpoint: Path, declared: int | None = None) -> int:
    """SCP steps behind ``checkpoint``: its lineage's, or ``declared`` for a checkpoint made before lineages were
    recorded (the release's model card gives them)."""
    found = scp_steps(lineage(checkpoint))
    return found if found or declared is None else declared


def chain_settings(raw: dict[str, Any], init: Path) -> dict[str, Any]:
    """What fixes the chain: its init and the stage config (model overrides, train, loss). Not its length: at a
    constant learning rate a chain can be lengthened (``--steps``) and carries on where it stopped."""
    return {"init": str(init), "config": raw}


def train(args: argparse.Namespace) -> int:
    from clara.config import SCPConfig, from_dict, init_model_config, merged, read_config_file
    from clara.data.records import load_scp_records
    from clara.model.checkpoint import load_checkpoint
    from clara.model.special import continue_with
    from clara.training.scp import train_scp

    root = chain_dir(args.chain)
    run = root / "run"
    raw = read_config_file(args.config) if args.config else {}
    settings = chain_settings(raw, args.init.resolve())
    fixed = root / "chain.json"
    recorded = json.loads(fixed.read_text(encoding="utf-8")) if fixed.is_file() else None
    if recorded is not None and {k: recorded.get(k) for k in settings} != settings:
        raise SystemExit(f"{fixed} holds another chain's settings ({recorded}); move it (and {run}) aside to "
                         f"start a new chain")
    # What the init was when the chain started, kept: a release exported from this chain replaces the init in place,
    # and its lineage already counts the chain's own steps.
    start = recorded or {}
    settings["prior_scp_steps"] = start.get("prior_scp_steps", prior_scp_steps(args.init, args.prior_scp_steps))
    settings["init_lineage"] = start.get("init_lineage", lineage(args.init))
    settings["seed"] = start.get("seed", generations(settings["init_lineage"]))
    model = load_checkpoint(args.init)
    continue_with(model, init_model_config(model.cfg, raw.get("model", {}), args.init))
    generation = settings["seed"]
    # constant lr after a short warm-up: the run may stop at any step and continue without a schedule restart
    train_cfg = merged({"batch_size": 8, "max_steps": args.steps, "checkpoint_every": 25, "seed": generation,
                        "optim": {"lr": 5e-4, "warmup_ratio": 0.005, "min_lr_ratio": 1.0}}, raw.get("train", {}))
    cfg = from_dict(SCPConfig, {**raw, "model": model.cfg, "train": train_cfg})
    root.mkdir(parents=True, exist_ok=True)
    fixed.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    records = load_scp_records(args.data)
    print(f"chain: {run} from {args.init} ({settings['prior_scp_steps']} SCP steps before it), "
          f"{cfg.train.max_steps} steps x {cfg.train.batch_size}, memory_slots={cfg.model.memory_slots}, "
          f"align={cfg.align}", flush=True)
    train_scp(model, records, cfg, run, stage="scp")
    return 0


def latest_checkpoint(root: Path) -> tuple[Path, int]:
    from clara.training.common import Checkpointer

    ck = Checkpointer(root / "run")
    steps = ck.steps()
    if not steps:
        raise SystemExit(f"no step checkpoint under {root / 'run'} yet")
    return ck.latest() / "model", steps[-1]  # type: ignore[operator]


def measure(args: argparse.Namespace) -> int:
    import quality_probe

    root = chain_dir(args.chain)
    settings = json.loads((root / "chain.json").read_text(encoding="utf-8"))
    checkpoint, step = latest_checkpoint(root)
    result = quality_probe.probe(str(checkpoint), args.dev, parts=args.parts, amp=args.amp)
    print(quality_probe.table(result), flush=True)
    a, s, d = result.get("reconstruction", {}), result.get("answer_spans", {}), result.get("slot_diversity", {})
    n = result.get("answer_nll", {})
    prior = settings["prior_scp_steps"] if "prior_scp_steps" in settings else prior_scp_steps(Path(settings["init"]))
    line = {"cumulative_scp_steps": prior + step, "run_step": step, "slot_cosine": d.get("within_passage_cosine"),
            "slot_cosine_centred": d.get("within_passage_cosine_centred"),
            "effective_rank": d.get("effective_rank"), "memory_ce": a.get("memory"),
            "gap_closed": a.get("gap_closed"), "memory_use": a.get("memory_use"),
            "answer_span_memory_use": s.get("memory_use"), "answer_use": n.get("answer_use"),
            "gold_answer_nll": n.get("clara_forced")}
    with (root / "curve.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def curve_table(lines: Sequence[dict[str, Any]]) -> str:
    cols = ("cumulative_scp_steps", "slot_cosine", "effective_rank", "memory_ce", "gap_closed", "memory_use",
            "answer_span_memory_use", "answer_use")
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for ln in lines:
        out.append("| " + " | ".join("–" if ln.get(c) is None else (f"{ln[c]:.3f}" if isinstance(ln[c], float)
                                                                      else str(ln[c])) for c in cols) + " |")
    return "\n".join(out)


def curve(args: argparse.Namespace) -> int:
    path = chain_dir(args.chain) / "curve.jsonl"
    if not path.is_file():
        raise SystemExit(f"no curve yet: {path} (run 'measure' at a stop)")
    print(curve_table([json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]))
    return 0


def _instruct_entry(extra: dict[str, Any], data_version: str, commit: str) -> dict[str, Any]:
    """One stage-2 run's lineage entry, from its checkpoint's ``extra``; or, for a weight average of checkpoints
    (``clara.model.checkpoint.average_checkpoints``), the average's: no steps, the weights and the digests of what
    was averaged (the checkpoints the earlier entries end at)."""
    if "averaged_from" in extra:
        parents = [_recorded_lineage(x) for x in extra["averaged_from"]]
        entry = {"stage": "average", "steps": 0, "weights": [x["weight"] for x in extra["averaged_from"]],
                 "of": [x["digest"] for x in extra["averaged_from"]], "commit": commit}
        # where every input records its stages, the entry holds them all and the lineage can start from it
        return {**entry, "parents": parents} if all(parents) else entry
    cfg = extra["config"]
    entry = {"stage": "instruct", "steps": int(extra.get("step", 0)), "batch_size": cfg["train"]["batch_size"],
             "seed": cfg["train"]["seed"], "freeze_compressor": cfg.get("freeze_compressor", False),
             "data": data_version, "commit": commit}
    if cfg.get("compressor_lr_scale", 1.0) != 1.0:
        entry["compressor_lr_scale"] = cfg["compressor_lr_scale"]
    if cfg.get("freeze_generator", False):
        entry["freeze_generator"] = True
    return entry


def release(args: argparse.Namespace) -> int:
    """Replace the release with a checkpoint of the chain (after its stage 2), recording the lineage: the old
    release's stages, then this chain's SCP steps and the stage 2 on top, each with its data and code version.
    Without ``--scp-checkpoint`` the stage 2 continued the release at ``--out`` itself, or ``--after`` (no chain
    steps): its lineage, then the stage-2 runs. A weight average whose inputs all record their lineage is one
    ``average`` entry that holds them (``clara model average`` on exported checkpoints)."""
    import subprocess

    from clara.model.checkpoint import read_checkpoint_config

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    # A chain step released as it is (no stage 2 on top: a chain that froze the generator keeps stage 2's reader)
    # is its --scp-checkpoint too; any other stage-1 checkpoint would pass for a stage-2 run below.
    as_is = args.scp_checkpoint is not None and args.checkpoint.resolve() == args.scp_checkpoint.resolve()
    if as_is and args.instruct_from:
        raise SystemExit("a chain step released as it is has no stage 2 on top: drop --instruct-from")
    own = read_checkpoint_config(args.checkpoint).get("extra", {})
    if not as_is and own.get("stage") == "scp":
        raise SystemExit(f"{args.checkpoint} is a stage-1 checkpoint: to release a chain step as it is, pass it as "
                         f"--scp-checkpoint too")
    # stage 2 may have continued earlier stage-2 runs (--instruct-from, oldest first): one lineage entry each
    extras = [read_checkpoint_config(c).get("extra", {}) for c in args.instruct_from] + ([] if as_is else [own])
    entries = [_instruct_entry(extra, args.data_version, commit) for extra in extras]
    whole = [i for i, e in enumerate(entries) if "parents" in e]
    if args.scp_checkpoint is None:
        if whole:  # an average whose inputs record their stages: nothing before it to add
            return _export(args, entries[whole[-1]:])
        after = args.after or args.out
        before = lineage(after)
        if not before:
            raise SystemExit(f"{after} records no lineage to continue: pass --scp-checkpoint")
        return _export(args, before + entries)
    if args.after is not None:
        raise SystemExit("--after is for a stage 2 that continued a checkpoint, not the chain: drop --scp-checkpoint")
    if whole:
        raise SystemExit(f"{args.checkpoint} averages checkpoints that record their whole lineage: release it "
                         f"without --scp-checkpoint")
    root = chain_dir(args.chain)
    settings = json.loads((root / "chain.json").read_text(encoding="utf-8"))
    init = Path(settings["init"])
    # The init's stages as they were when the chain started (the release may since have been replaced by one
    # exported from this very chain, whose lineage already counts the chain's steps).
    before = settings.get("init_lineage") or json.loads(args.init_lineage or "[]")
    if not before:
        raise SystemExit(f"{init} records no lineage: pass --init-lineage (its model card gives its stages)")
    if not settings.get("init_lineage"):
        settings["init_lineage"] = before
        (root / "chain.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    state = args.scp_checkpoint.parent / "train_state" / "trainer_state.json"  # a step checkpoint's own step
    chain_steps = int(json.loads(state.read_text(encoding="utf-8"))["step"])
    new = before + [
        {"stage": "scp", "steps": chain_steps, "batch_size": settings["config"].get("train", {}).get("batch_size", 8),
         "config": settings["config"], "data": args.data_version, "commit": commit}, *entries]
    return _export(args, new)


def _export(args: argparse.Namespace, new: list[dict[str, Any]]) -> int:
    """Write ``--checkpoint`` to ``--out`` with lineage ``new``, the probe's summary and the notes."""
    from clara.model.checkpoint import export_release, release_notes

    probe = json.loads(args.probe.read_text(encoding="utf-8")) if args.probe else {}
    summary = {k: probe.get(k) for k in ("slot_diversity", "reconstruction", "answer_spans", "answer_nll",
                                          "generator", "compare") if k in probe}
    try:
        notes = release_notes(args.note)  # provenance: corpus and data hashes, what was held out
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    export_release(args.checkpoint, args.out, extra={**notes, "lineage": new, "probe": summary})
    print(json.dumps(new, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chain", type=Path, default=None, help="Chain folder (default $CLARA_CACHE_DIR/chain).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="Continue the chain (or start it from --init).")
    t.add_argument("--data", type=Path, required=True, help="Stage-1 rows (clara data mix's scp.jsonl).")
    t.add_argument("--init", type=Path, default=DEFAULT_RELEASE, help="Where a new chain starts.")
    t.add_argument("--config", type=Path, default=None, help="SCP config (JSON/TOML): model, train, loss.")
    t.add_argument("--steps", type=int, default=6000, help="The run's length in optimizer steps.")
    t.add_argument("--prior-scp-steps", type=int, default=None,
                   help="SCP steps behind --init when its clara.json records no lineage (its model card says).")
    m = sub.add_parser("measure", help="Probe the latest checkpoint; append to curve.jsonl.")
    m.add_argument("--dev", type=Path, default=ROOT / "benchmarks" / "dev" / "natural_dev.jsonl")
    m.add_argument("--parts", default="an")
    m.add_argument("--amp", choices=("bf16", "off"), default=None)
    m.add_argument("--out", type=Path, default=None)
    sub.add_parser("curve", help="Print the curve.")
    r = sub.add_parser("release", help="Export a stage-2 checkpoint of the chain as the release, with its lineage.")
    r.add_argument("--checkpoint", type=Path, required=True,
                   help="The stage-2 model folder on top of the chain (a chain step released as it is: given as "
                        "--scp-checkpoint too).")
    r.add_argument("--scp-checkpoint", type=Path, default=None,
                   help="The chain checkpoint stage 2 started from (none: stage 2 continued the release at --out).")
    r.add_argument("--instruct-from", type=Path, nargs="*", default=[],
                   help="Earlier stage-2 model folders --checkpoint continued (its --init), oldest first.")
    r.add_argument("--after", type=Path, default=None,
                   help="Without --scp-checkpoint: the checkpoint the oldest stage-2 run started from (default --out).")
    r.add_argument("--out", type=Path, default=DEFAULT_RELEASE)
    r.add_argument("--probe", type=Path, default=None, help="The probe JSON of --checkpoint (with its compare).")
    r.add_argument("--data-version", required=True, help="Corpus / synthesis hashes the stages read.")
    r.add_argument("--init-lineage", default=None, help="JSON list of the init's stages when it records none.")
    r.add_argument("--note", action="append", default=[],
                   help="KEY=VALUE recorded in the release's clara.json, as `clara model release --note` (repeatable).")
    args = ap.parse_args(argv)
    return {"train": train, "measure": measure, "curve": curve, "release": release}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
