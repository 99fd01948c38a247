"""Diagnostic: can the generator read memory vectors at all? Optimise the memory vectors of 4 held-out passages
directly (no compressor; Adam on the vectors), with a checkpoint's generator adapter (or ``none``: the bare base),
and print the reconstruction CE every 10 steps. If it falls far below what the compressor's vectors give, the
generator can read and the compressor is the limit.

    python benchmarks/cram_probe.py CHECKPOINT generator|none STEPS LR"""
import sys, time, json, torch
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_probe import first_articles
from clara.data.corpus import ingest_corpus
from clara.data.mixes import heldout
from clara.model import prompts
from clara.model.checkpoint import load_checkpoint
ckpt, adapter, steps, lr = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
adapter = None if adapter == "none" else adapter
model = load_checkpoint(ckpt)
docs, _ = ingest_corpus("bundled", model.cfg)
held = [d for d in first_articles(docs, 2000) if heldout(d)][:4]
chunk = [p.full_text for p in held]
targets = [model.target_ids(t, 1024) for t in chunk]
mems = model.compress(chunk)
rows = [model.prompt_ids(prompts.PARAPHRASE_USER[0].format(documents=model.placeholders(m.shape[0]))) for m in mems]
model.set_trainable([], special=False)
vecs = [torch.nn.Parameter(m.detach().float().clone()) for m in mems]
opt = torch.optim.Adam(vecs, lr=lr)
model.peft.eval()
t0 = time.time()
for s in range(steps + 1):
    with model.adapter(adapter):
        loss = model.response_loss(rows, targets, [[v] for v in vecs])
    if s % 10 == 0:
        print(json.dumps({"step": s, "ce": round(loss.item(), 3), "norm": round(vecs[0].norm(dim=-1).mean().item(), 1), "s": round(time.time() - t0)}), flush=True)
    opt.zero_grad(); loss.backward(); opt.step()
