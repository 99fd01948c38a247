"""Throughput of compression and of one SCP step with a real-size (7B-shaped) config, random weights, bf16.

Ratios are against the bare base model measured in the same run: compressing a batch vs one plain forward over
the same document tokens, and a full SCP step (compressor + generator forward and backward) vs that forward.

    python benchmarks/gpu_throughput.py --shape mistral-7b --out runs/gpu_throughput.json   # needs a GPU
    python benchmarks/gpu_throughput.py --shape tiny --device cpu                          # smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from clara.config import preset
from clara.model import ClaraModel
from clara.model.base import build_tiny_tokenizer, resolve_dtype
from clara.training.scp import Example, compressed_lm_loss

SHAPES = {
    # Mistral-7B-Instruct-v0.2 dimensions.
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32000),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mistral-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rate", type=int, default=16)
    ap.add_argument("--doc-len", type=int, default=256)
    ap.add_argument("--compress-batch", type=int, default=32)
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("runs/gpu_throughput.json"))
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    dtype = resolve_dtype("auto", device)
    with torch.device(device):
        base = LlamaForCausalLM(LlamaConfig(**SHAPES[args.shape], max_position_embeddings=4096,
                                            tie_word_embeddings=False)).to(dtype)
    base.eval().requires_grad_(False)
    tok = build_tiny_tokenizer()
    cfg = preset("tiny", compression_rate=args.rate, doc_max_len=args.doc_len, device=args.device,
                 lora=dict(r=16, alpha=32, dropout=0.1))
    model = ClaraModel(cfg, base, tok)
    # Random byte-level text long enough to fill doc_len tokens.
    rng = random.Random(0)
    words = ["alpha", "river", "capital", "1905", "theory", "north", "sea", "France", "energy", "light"]
    docs = [" ".join(rng.choice(words) for _ in range(args.doc_len)) for _ in range(args.compress_batch)]
    n_tok = sum(len(t) for t in model.tokenize_texts(docs, cfg.doc_max_len))

    ids = torch.tensor(model.tokenize_texts(docs, cfg.doc_max_len), device=device)
    with torch.no_grad():
        t_base = timed(lambda: base.model(input_ids=ids), device, args.repeats)
    t_comp = timed(lambda: model.compress(docs, batch_size=args.compress_batch), device, args.repeats)

    model.set_trainable(["compressor", "generator"], special=True)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    batch = [Example([d], ("Background:\n{documents} means the same as",), d) for d in docs[: args.train_batch]]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        loss, _ = compressed_lm_loss(model, batch, 0.1, args.doc_len, random.Random(0))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.peft.train()
    t_step = timed(step, device, args.repeats)
    result = {
        "shape": args.shape, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype), "rate": args.rate, "doc_len": args.doc_len,
        "params_b": sum(p.numel() for p in base.parameters()) / 1e9,
        "base_forward_docs_per_s": len(docs) / t_base,
        "compress_docs_per_s": len(docs) / t_comp,
        "compress_tokens_per_s": n_tok / t_comp,
        "compress_vs_base_forward": t_base / t_comp,
        "scp_step_s": t_step, "scp_batch": args.train_batch,
        "scp_step_vs_base_forward_per_doc": (t_step / args.train_batch) / (t_base / len(docs)),
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
