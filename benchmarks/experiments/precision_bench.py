"""fp32 vs bf16 autocast on this CPU, in one run: speed ratios and whether the numbers agree.

    python benchmarks/experiments/precision_bench.py [--out benchmarks/results/experiments/precision.json]

Same model (SmolLM2-135M with the same seeded adapters), same inputs, measured back to back in each mode:
- **training step**: SCP loss (CE + 0.1 MSE) forward + backward over 4 passages;
- **compression**: documents/s through the compressor;
- **generation**: new tokens/s of greedy decoding from compressed documents;
- **agreement**: the SCP loss and the held-out reconstruction CE (the quality probe's part (a)) in both modes.

``ModelConfig.amp="auto"`` turns bf16 autocast on only where the CPU has native bf16 (avx512_bf16 / AMX); the JSON
records whether this CPU has it, so a ratio below 1 on a CPU without it is the expected answer, not a bug.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _timed(fn, reps: int) -> tuple[float, Any]:
    fn()  # warm-up: first calls pay for kernel selection
    t0 = time.perf_counter()
    out = None
    for _ in range(reps):
        out = fn()
    return (time.perf_counter() - t0) / reps, out


def run(reps: int = 2, n_docs: int = 8, new_tokens: int = 16) -> dict[str, Any]:
    from clara.data.corpus import ingest_corpus
    from clara.config import preset
    from clara.data.mixes import heldout
    from clara.model import ClaraModel
    from clara.model.base import cpu_has_native_bf16
    from clara.training.scp import Example, compressed_lm_loss
    from clara.model import prompts
    from quality_probe import reconstruction

    torch.manual_seed(0)
    model = ClaraModel.build(preset("smollm2-135m", amp="off"))
    with torch.no_grad():  # non-trivial adapters, so both modes run the same non-identity LoRA path
        for name, p in model.peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
    docs, _ = ingest_corpus("bundled", model.cfg)
    train_docs = [d.full_text for d in docs[:n_docs]]
    held = [d for d in docs if heldout(d)][:8]
    batch = [Example([t], prompts.PARAPHRASE_USER[:1], t) for t in train_docs[:4]]
    model.set_trainable(["compressor", "generator"], special=True)

    results: dict[str, Any] = {}
    for mode in ("fp32", "bf16"):
        model.uses_amp = mode == "bf16"
        model.peft.train()

        def step():
            loss, _ = compressed_lm_loss(model, batch, 0.1, 1024, random.Random(0))
            loss.backward()
            model.peft.zero_grad(set_to_none=True)
            return loss.item()

        step_s, loss = _timed(step, reps)
        model.peft.eval()
        comp_s, mems = _timed(lambda: model.compress(train_docs, batch_size=n_docs), reps)
        questions = ["What is this about?"] * 4
        gen_s, _ = _timed(lambda: model.generate(questions, [[m] for m in mems[:4]], max_new_tokens=new_tokens,
                                                 eos_token_id=-1), 1)  # no EOS: every row decodes all tokens
        recon = reconstruction(model, held)
        results[mode] = {"train_step_s": step_s, "scp_loss": loss, "compress_docs_per_s": n_docs / comp_s,
                         "generate_tokens_per_s": 4 * new_tokens / gen_s, "reconstruction": recon}
    f, b = results["fp32"], results["bf16"]
    results["speedup_bf16_over_fp32"] = {
        "train_step": f["train_step_s"] / b["train_step_s"],
        "compression": b["compress_docs_per_s"] / f["compress_docs_per_s"],
        "generation": b["generate_tokens_per_s"] / f["generate_tokens_per_s"]}
    results["agreement"] = {
        "scp_loss_rel_diff": abs(b["scp_loss"] - f["scp_loss"]) / f["scp_loss"],
        "reconstruction_memory_ce_diff": b["reconstruction"]["memory"] - f["reconstruction"]["memory"],
        "reconstruction_raw_ce_diff": b["reconstruction"]["raw_document"] - f["reconstruction"]["raw_document"]}
    results["machine"] = {"cpu_native_bf16": cpu_has_native_bf16(), "threads": torch.get_num_threads(),
                          "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                          "processor": platform.processor() or platform.machine(), "torch": torch.__version__}
    results["setup"] = {"reps": reps, "docs": n_docs, "new_tokens": new_tokens, "model": "smollm2-135m, rho=16"}
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/experiments/precision.json"))
    args = ap.parse_args(argv)
    r = run(args.reps)
    s, a = r["speedup_bf16_over_fp32"], r["agreement"]
    print(f"CPU native bf16: {r['machine']['cpu_native_bf16']} ({r['machine']['cpu_capability']})")
    print(f"bf16/fp32 speed-up: training step {s['train_step']:.2f}x, compression {s['compression']:.2f}x, "
          f"generation {s['generation']:.2f}x")
    print(f"agreement: SCP loss rel. diff {a['scp_loss_rel_diff']:.4f}; reconstruction CE diff "
          f"{a['reconstruction_memory_ce_diff']:+.4f} (memory), {a['reconstruction_raw_ce_diff']:+.4f} (raw)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
