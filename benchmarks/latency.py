"""Latency the way compressed-context work reports it: time to first token (TTFT) and end to end, CLaRa against
raw text with the same base, swept over k (documents per question) and the compression rate, in one run.

    python benchmarks/latency.py [--preset smollm2-135m] [--out benchmarks/results/latency.json]

For each k, raw text puts the k passages in the prompt; CLaRa puts k x (doc_max_len / rate) memory vectors there
(compressed beforehand, as the store holds them: compression is reported separately, per document, not in TTFT).
Every call decodes exactly ``--new-tokens`` tokens (EOS disabled) so end-to-end times compare like with like.
Adapters are freshly initialised: timing does not depend on trained weights. Per cell: TTFT and end-to-end p50/p95,
decode tokens/s, and the ratios raw / CLaRa measured in this run. Writes JSON and a plot (``latency.png``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

NO_EOS = -1  # an id no tokenizer produces: decoding always runs to --new-tokens


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def timed(call, repeats: int) -> dict[str, float]:
    from clara.model.decoding import Timing

    call(Timing())  # warm-up: allocator, kernels, caches
    ttft, total, tps = [], [], []
    for _ in range(repeats):
        t = Timing()
        call(t)
        ttft.append(t.first_token_s)
        total.append(t.total_s)
        if t.decode_tokens_per_s is not None:
            tps.append(t.decode_tokens_per_s)
    return {"ttft_ms_p50": pct(ttft, 50), "ttft_ms_p95": pct(ttft, 95), "e2e_ms_p50": pct(total, 50),
            "e2e_ms_p95": pct(total, 95), "decode_tokens_per_s": statistics.median(tps) if tps else None}


def versus(cell: dict[str, Any], raw: dict[str, Any], prompt_tokens: int | None = None) -> dict[str, Any]:
    """``cell`` with its speed-ups over the raw-text cell ``raw`` of the same run (above 1: CLaRa is faster) and, given
    the tokens it prefilled, their ratio to raw text's: the TTFT ratio's physical limit, since prefill cost follows
    the tokens prefilled."""
    cell["ttft_speedup_vs_raw"] = raw["ttft_ms_p50"] / cell["ttft_ms_p50"]
    cell["e2e_speedup_vs_raw"] = raw["e2e_ms_p50"] / cell["e2e_ms_p50"]
    if prompt_tokens is not None:
        cell["prompt_tokens"] = prompt_tokens
        cell["prompt_token_ratio"] = raw["prompt_tokens"] / prompt_tokens
    return cell


def against_best_raw(cell: dict[str, Any], raw: dict[str, Any], k: int) -> dict[str, Any]:
    """``cell``'s speed-ups over raw text at its best per measure, of its two ways in this run: unmerged under
    autocast, and the served way (the bare base's merged copies, prefix cached). A served CLaRa is not credited
    with raw text's weaker configuration."""
    ways = [raw[k], raw[f"{k}_prefix"]]
    cell["ttft_speedup_vs_best_raw"] = min(w["ttft_ms_p50"] for w in ways) / cell["ttft_ms_p50"]
    cell["e2e_speedup_vs_best_raw"] = min(w["e2e_ms_p50"] for w in ways) / cell["e2e_ms_p50"]
    return cell


def served_cells(model, base_model, result: dict[str, Any], question: str, texts: list[str], mems, ks: list[int],
                 new_tokens: int, repeats: int) -> dict[str, Any]:
    """The served path in the same run: the generator and query reasoner merged into plain copies of the base
    (``ClaraModel.merge_adapters``) and the fixed system-prompt prefix cached (``ClaraModel.cache_prefix``), beside
    raw text run the same way from the bare base's copies with the same prefix cached (fair: same dtypes, same
    prefix).
    Raw text's prefix-cached cells go into ``result["raw"]`` as ``<k>_prefix``."""
    cells: dict[str, Any] = {}
    base_model.merge_adapters([None])  # raw text runs from the same kind of copies: fair
    base_model.cache_prefix()
    prefix = max((len(p) for p in base_model._prefix_cache.prefixes), default=0)
    for k in ks:
        key = f"{k}_prefix"
        if key not in result["raw"]:
            result["raw"][key] = timed(lambda t, k=k: base_model.generate_from_text(
                [question], [texts[:k]], max_new_tokens=new_tokens, timing=t, eos_token_id=NO_EOS), repeats)
            result["raw"][key]["prompt_tokens"] = result["raw"][k]["prompt_tokens"] - prefix
    model.merge_adapters()
    model.cache_prefix()
    for k in ks:
        cell = timed(lambda t, k=k: model.generate([question], [mems[:k]], max_new_tokens=new_tokens, timing=t,
                                                   eos_token_id=NO_EOS), repeats)
        tokens = len(model.prompter.qa_prompt(question, [m.shape[0] for m in mems[:k]])) - prefix
        cells[f"{k}_served"] = against_best_raw(versus(cell, result["raw"][f"{k}_prefix"], tokens), result["raw"], k)
        print(f"clara k={k} served (merged generator, prefix cached) vs raw text prefix cached: {cell}", flush=True)
    model.cache_prefix(False)
    model.unmerge_adapters()
    base_model.cache_prefix(False)
    base_model.unmerge_adapters()
    return cells


def run(preset_name: str, ks: list[int], rates: list[int], repeats: int, new_tokens: int, seed: int,
        merged: bool = False, served: bool = False) -> dict[str, Any]:
    from clara.data.corpus import ingest_corpus
    from clara.config import preset
    from clara.model.clara_model import ClaraModel

    torch.manual_seed(seed)
    cfg0 = preset(preset_name)
    docs, _ = ingest_corpus("bundled", cfg0)
    rng = np.random.default_rng(seed)
    texts = [docs[i].full_text for i in rng.choice(len(docs), max(ks), replace=False)]
    question = "Which city was the capital of the empire when the treaty described above was signed?"
    result: dict[str, Any] = {"preset": preset_name, "base": cfg0.base, "doc_max_len": cfg0.doc_max_len,
                              "new_tokens": new_tokens, "repeats": repeats, "threads": torch.get_num_threads(),
                              "machine": platform.processor() or platform.machine(), "raw": {}, "clara": {}}
    base_model = None
    for rate in rates:
        model = ClaraModel.build(preset(preset_name, compression_rate=rate))
        model.peft.eval()
        if base_model is None:  # raw text: the same base with adapters off, measured once per k
            base_model = model
            doc_tokens = model.tokenize_texts(texts, cfg0.doc_max_len)
            result["doc_tokens_mean"] = float(np.mean([len(t) for t in doc_tokens]))
            for k in ks:
                result["raw"][k] = timed(lambda t, k=k: model.generate_from_text(
                    [question], [texts[:k]], max_new_tokens=new_tokens, timing=t, eos_token_id=NO_EOS), repeats)
                result["raw"][k]["prompt_tokens"] = len(model.prompter.text_qa_prompt(question, texts[:k]))
                print(f"raw text k={k}: {result['raw'][k]}", flush=True)
        t0 = time.perf_counter()
        mems = model.compress(texts)
        compress_s = time.perf_counter() - t0
        cells = {"memory_tokens_per_doc": int(mems[0].shape[0]), "compress_docs_per_s": len(texts) / compress_s}
        for k in ks:
            cell = timed(lambda t, k=k: model.generate([question], [mems[:k]], max_new_tokens=new_tokens, timing=t,
                                                       eos_token_id=NO_EOS), repeats)
            prompt = model.prompter.qa_prompt(question, [m.shape[0] for m in mems[:k]])
            cells[k] = versus(cell, result["raw"][k], len(prompt))
            print(f"clara rate {rate} k={k}: {cell}", flush=True)
        if merged:  # the served path: the generator's LoRA merged into a copy of the base (same run, same k)
            model.merge_adapters(["generator"])
            for k in ks:
                cell = timed(lambda t, k=k: model.generate([question], [mems[:k]], max_new_tokens=new_tokens,
                                                           timing=t, eos_token_id=NO_EOS), repeats)
                cells[f"{k}_merged"] = versus(cell, result["raw"][k])
                print(f"clara rate {rate} k={k} merged generator: {cell}", flush=True)
            model.unmerge_adapters()
        if served:
            cells.update(served_cells(model, base_model, result, question, texts, mems, ks, new_tokens, repeats))
        result["clara"][rate] = cells
    return result


def random_memories(model, docs, seed: int):
    """A store source of random unit memory vectors, each document with the slot count its length gives: the
    first stage's SQL, the candidate fetch and the re-rank cost the same whatever the vectors hold, and compressing
    the whole bundled corpus takes ~21 min on 2 cores. (The dense vectors stay real: the HNSW search depends on
    them.)"""
    rng = np.random.default_rng(seed)

    def batches(loaded: set[str]):
        todo = [d for d in docs if d.id not in loaded]
        for s in range(0, len(todo), 512):
            batch = todo[s: s + 512]
            tokens = model.tokenize_texts([d.full_text for d in batch], model.cfg.doc_max_len)
            mems = [rng.standard_normal((model.cfg.n_mem_for(len(t)), model.hidden_size)).astype(np.float32)
                    for t in tokens]
            yield [d.id for d in batch], [m / np.linalg.norm(m, axis=1, keepdims=True) for m in mems]

    return batches


def retrieval_run(preset_name: str, passages: list[int], n_questions: int, k: int, seed: int,
                  database_url: str | None = None, random_memory: bool = False) -> dict[str, Any]:
    """The served retrieval path, stage by stage (``clara.retrieval.timing.STAGES``): hybrid first stage (MiniLM +
    Postgres BM25, RRF) and the query reasoner's re-rank, one question at a time, on a build of ``n`` bundled
    passages per entry of ``passages`` in the embedded Postgres (or ``database_url``). Measured twice in the same
    run on the same build: as evaluation runs it (adapters unmerged, under autocast) and as the served model runs
    it (``merge_adapters``: plain merged copies in the compute dtype). ``random_memory``: the build holds random
    memory vectors (``random_memories``) instead of compressed ones."""
    from clara.config import preset
    from clara.data.corpus import corpus_version_of, ingest_corpus
    from clara.data.records import load_qa_records
    from clara.model.clara_model import ClaraModel
    from clara.retrieval.dense import DenseEncoder
    from clara.retrieval.rerank import ClaraRetriever
    from clara.retrieval.timing import STAGES, StageTimes
    from clara.store.db import connect
    from clara.store.builds import StoreError, ready_build
    from clara.store.loading import index_corpus, load_build

    torch.manual_seed(seed)
    model = ClaraModel.build(preset(preset_name))
    model.peft.eval()
    docs, _ = ingest_corpus("bundled", model.cfg)
    dev = Path(__file__).parent / "dev" / "natural_dev.jsonl"
    questions = [r.question for r in load_qa_records(dev)][:n_questions]
    engine, dense = connect(database_url), DenseEncoder()
    result: dict[str, Any] = {"preset": preset_name, "k": k, "mode": "hybrid", "questions": len(questions),
                              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                              "stages": list(STAGES), "passages": {}}
    for n in passages:
        rng = np.random.default_rng(seed)
        sub = docs if n >= len(docs) else [docs[i] for i in sorted(rng.choice(len(docs), n, replace=False))]
        t0 = time.perf_counter()
        uri = f"latency:{preset_name}:seed{seed}" + (":random-memory" if random_memory else "")
        if random_memory:
            try:
                build = ready_build(engine, model_uri=uri, corpus_version=corpus_version_of(sub))
            except StoreError:
                build = load_build(engine, sub, random_memories(model, sub, seed), model_uri=uri,
                                   corpus_version=corpus_version_of(sub), compression_rate=model.cfg.compression_rate,
                                   hidden_size=model.hidden_size, n_mem_max=model.cfg.n_mem_max, dense=dense)
        else:
            build = index_corpus(engine, model, sub, model_uri=uri, corpus_version=corpus_version_of(sub),
                                 dense=dense, reuse=True)
        cells: dict[str, Any] = {"passages": len(sub), "build_s": time.perf_counter() - t0,
                                 "memories": "random" if random_memory else "compressed"}
        for variant in ("unmerged", "served"):
            if variant == "served":
                model.merge_adapters()
            retriever = ClaraRetriever(model, [], engine=engine, build=build, mode="hybrid")
            total = []
            for i, q in enumerate([questions[0]] * 3 + questions):  # three warm-up questions, not counted
                if i == 3:
                    retriever.times = StageTimes()
                t = time.perf_counter()
                retriever.retrieve_batch([q], k)
                if i >= 3:
                    total.append(time.perf_counter() - t)
            cells[variant] = {"ms_p50": pct(total, 50), "ms_p99": pct(total, 99),
                              "stages_ms_p50": retriever.times.p50()}
            print(f"{len(sub)} passages, {variant}: p50 {cells[variant]['ms_p50']:.1f} ms "
                  f"{ {s: round(v, 1) for s, v in cells[variant]['stages_ms_p50'].items()} }", flush=True)
        model.unmerge_adapters()
        cells["speedup"] = cells["unmerged"]["ms_p50"] / cells["served"]["ms_p50"]
        result["passages"][len(sub)] = cells
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(int(k) for k in result["raw"] if str(k).isdigit())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "ttft_ms_p50", "time to first token (p50)"),
                           (axes[1], "e2e_ms_p50", f"end to end, {result['new_tokens']} new tokens (p50)")):
        ax.plot(ks, [result["raw"][k][key] for k in ks], "k-o", label="raw text")
        for rate, cells in result["clara"].items():
            ax.plot(ks, [cells[k][key] for k in ks], "-o", label=f"CLaRa rate {rate}")
        ax.set_xlabel("documents per question (k)")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{result['base']}, {result['doc_max_len']}-token passages, {result['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prefill_run(preset_name: str, lengths: list[int], repeats: int, seed: int) -> dict[str, Any]:
    """What a prompt of L tokens costs the served generator's layers (its fp32 decoding copy and the bf16 twin that
    prefills, ``ClaraModel.merge_adapters``), p50 ms per L: the cost is not proportional to L, which bounds the TTFT
    ratio of a short prompt against a long one below their token ratio."""
    from clara.config import preset
    from clara.model.clara_model import ClaraModel

    torch.manual_seed(seed)
    model = ClaraModel.build(preset(preset_name))
    model.merge_adapters(["generator"])
    out: dict[str, Any] = {"preset": preset_name, "repeats": repeats, "threads": torch.get_num_threads(),
                           "machine": platform.processor() or platform.machine(), "lengths": {}}
    with torch.no_grad():
        copies = {"decoding copy": model._merged.get("generator"), "prefill twin": model._merged.prefill("generator")}
        for n in lengths:
            cell = {}
            for name, lm in copies.items():
                if lm is None:
                    continue
                x = torch.randn(1, n, model.hidden_size, dtype=lm.dtype)
                times = []
                for i in range(repeats + 1):  # the first call warms up
                    t0 = time.perf_counter()
                    lm.get_decoder()(inputs_embeds=x, use_cache=True)
                    times.append(time.perf_counter() - t0)
                cell[f"{name} ({str(lm.dtype).removeprefix('torch.')}) ms p50"] = pct(times[1:], 50)
            out["lengths"][n] = cell
            print(f"{n} tokens: {cell}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--ks", default="1,5,10,20")
    ap.add_argument("--rates", default="4,16,64")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/latency.json"))
    ap.add_argument("--merge-generator", action="store_true",
                    help="Also time CLaRa decoding from the merged generator, same run.")
    ap.add_argument("--served", action="store_true",
                    help="Also time the served path (merged generator, system prefix cached) against raw text with "
                         "the same prefix cached, same run.")
    ap.add_argument("--retrieval", default=None, metavar="PASSAGES",
                    help="Instead: time the served retrieval path stage by stage on builds of these many bundled "
                         "passages (e.g. 300,12878), unmerged vs served, same run.")
    ap.add_argument("--questions", type=int, default=100, help="--retrieval: dev questions timed.")
    ap.add_argument("--prefill-lengths", default=None, metavar="TOKENS",
                    help="Instead: time the served generator's layers over prompts of these lengths (e.g. 20,70,400).")
    ap.add_argument("--random-memory", action="store_true",
                    help="--retrieval: builds hold random memory vectors instead of compressed ones (same SQL and "
                         "re-rank cost; compressing the whole corpus takes ~21 min on 2 cores).")
    args = ap.parse_args()
    if args.prefill_lengths:
        result = prefill_run(args.preset, [int(x) for x in args.prefill_lengths.split(",")], args.repeats, args.seed)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
        return
    if args.retrieval:
        result = retrieval_run(args.preset, [int(x) for x in args.retrieval.split(",")], args.questions, 5, args.seed,
                               random_memory=args.random_memory)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
        return
    ks = [int(x) for x in args.ks.split(",")]
    rates = [int(x) for x in args.rates.split(",")]
    result = run(args.preset, ks, rates, args.repeats, args.new_tokens, args.seed, args.merge_generator,
                 args.served)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    print(f"\n{'k':>3} {'raw TTFT':>9} " + " ".join(f"{'r' + str(r) + ' TTFT':>9} {'x':>5}" for r in rates)
          + "   end-to-end speed-up per rate")
    for k in ks:
        raw = result["raw"][k]
        cells = " ".join(f"{result['clara'][r][k]['ttft_ms_p50']:9.1f} {result['clara'][r][k]['ttft_speedup_vs_raw']:5.2f}"
                         for r in rates)
        e2e = " ".join(f"{result['clara'][r][k]['e2e_speedup_vs_raw']:5.2f}" for r in rates)
        print(f"{k:>3} {raw['ttft_ms_p50']:9.1f} {cells}   {e2e}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
