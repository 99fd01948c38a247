"""Budgets of the pipeline as named profiles: the deployment's ``profile`` parameter picks one, and any parameter
given explicitly wins over the profile's value.

- ``demo`` (default): ``make pipeline`` on a 2-core laptop CPU; 300 passages, starts from the shipped release
  (``RELEASE``) and runs a few dozen steps of stage 2 and E2E. ``--param model='{"init_from": "none"}' --param
  training='{"scp_steps": 30}'`` trains everything from scratch instead.
- ``quality``: the whole corpus on a CPU, ~9 hours on 2 avx512_bf16 cores at the measured step times
  (docs/benchmarks.md, "What to expect");
  every stage resumes from its step checkpoints, so it can be stopped and started again.
- ``gpu``: the whole corpus on one GPU (bf16), larger batches.

``scp_target_dropout`` is SCP's word dropout (``clara.config.SCPConfig.target_dropout``; 0, the paper's recipe, in
every profile): it makes the compressor carry far more of its passage, but no measured run has answered better
with it yet, and in ``demo`` it cost F1 (docs/quality.md, "Stage-1 recipes").
Step counts are optimizer steps; ``*_batch_size`` examples each (stage 2 and E2E examples carry k passages).
``max_docs=0`` means the whole corpus. ``init_from`` is a checkpoint folder (relative paths are read from the
project folder) that SCP continues from; ``"none"`` turns a profile's starting point off.
"""

from __future__ import annotations

from typing import Any

RELEASE = "releases/clara-smollm2-r16"
"""The shipped starting point (SmolLM2-135M, rate 16; model card in its folder). ``demo`` uses its compressor as it
is (``scp_steps=0``: 30 SCP steps on 300 passages would only wear it down) and fine-tunes stage 2 and E2E on the
run's own data; its probe beside what ``demo`` trained from scratch is in docs/quality.md."""

PROFILES: dict[str, dict[str, Any]] = {
    "demo": dict(init_from=RELEASE, max_docs=300, scp_steps=0, scp_batch_size=4, scp_target_dropout=0.0,
                 instruct_steps=20, instruct_batch_size=1,
                 e2e_steps=10, e2e_batch_size=2, eval_questions=30),
    "quality": dict(init_from=None, max_docs=0, scp_steps=3000, scp_batch_size=4, scp_target_dropout=0.0,
                    instruct_steps=1500, instruct_batch_size=2,
                    e2e_steps=300, e2e_batch_size=2, eval_questions=150),
    "gpu": dict(init_from=None, max_docs=0, scp_steps=1600, scp_batch_size=32, scp_target_dropout=0.0,
                instruct_steps=600, instruct_batch_size=16,
                e2e_steps=200, e2e_batch_size=16, eval_questions=300),
}



def resolve(profile: str, given: dict[str, Any]) -> dict[str, Any]:
    """The profile's values with the explicitly given parameters (those not ``None``) on top.

    Raises:
        ValueError: an unknown profile name, or SCP with neither steps nor a starting point.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    out = dict(PROFILES[profile])
    out.update({k: v for k, v in given.items() if v is not None})
    if str(out.get("init_from") or "").lower() in ("", "none"):
        out["init_from"] = None
    if out.get("scp_steps") == 0 and out["init_from"] is None:
        raise ValueError("scp_steps=0 means 'use init_from as it is', and no init_from is set: give scp_steps "
                         "(e.g. 30) to train SCP from scratch")
    return out
