"""SCP stage-1 reconstruction variants on the reading side and the compressor's learning rate, probed on held-out
reconstruction (the quality probe's part (a), 40 held-out passages), beside ``scp_recipe.py``'s rank/lr/rate:

    python benchmarks/experiments/scp_variants.py NAME STEPS [--clr LR] [--glr LR] [--wdrop P] [--freeze-gen N] [--const]
                                                [--mse W] [--chunk-mse] [--lexical A] [--layer N] [--soft-vocab T]
                                                [--rescale R] [--distill W [--distill-every N]]

--clr / --glr: compressor (+ special rows) / generator learning rates; --wdrop: word dropout on the teacher-forced
target inputs (labels unchanged; ``SCPConfig.target_dropout``), so the generator cannot lean on its own prefix; --freeze-gen N: the generator
frozen for the first N steps (N = STEPS: the base reads the memory, ICAE-style); --mse: the alignment weight;
--chunk-mse: align each memory slot to the mean state of its chunk of the passage (not all slots' mean to all);
--distill W: context distillation, W times the normalised MSE between the generator's hidden states (every N-th
layer, at the target positions) reading the memory and the frozen base's reading the raw passage.
Readouts that depart from the paper's (memory = last-layer states): --lexical A adds each memory slot's chunk of
input embeddings (a bag of its 16 tokens, scaled to the state's norm, times A); --layer N reads memory after layer
N; --soft-vocab T reads it through the LM head (softmax at temperature T, times the input embeddings: the base
generator can read that from step 0).

Every 10 steps it prints the live control (a fresh batch read with its own vs a neighbour's memory: ``use``), and
at the end the quality probe's part (a) with its controls; ``memory_use`` (nats/token a passage's own memory is
worth over another's) is the number that says whether the compressor carries the passage. Writes
benchmarks/results/experiments/scp_recipe/v_NAME.json."""
import argparse, json, random, sys, time
import torch, torch.nn.functional as F
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from quality_probe import first_articles, reconstruction
from clara.data.corpus import ingest_corpus
from clara.config import preset
from clara.data.mixes import heldout, reconstruction_rows
from clara.data.records import parse_scp_record
from clara.model.clara_model import ClaraModel
from clara.training import scp as S
from clara.training.common import warmup_cosine

ap = argparse.ArgumentParser()
ap.add_argument("name"); ap.add_argument("steps", type=int)
ap.add_argument("--clr", type=float, default=5e-4); ap.add_argument("--glr", type=float, default=5e-4)
ap.add_argument("--wdrop", type=float, default=0.0); ap.add_argument("--bs", type=int, default=8)
ap.add_argument("--mse", type=float, default=0.1); ap.add_argument("--freeze-gen", type=int, default=0)
ap.add_argument("--const", action="store_true")
ap.add_argument("--lexical", type=float, default=0.0)
ap.add_argument("--layer", type=int, default=0)
ap.add_argument("--soft-vocab", type=float, default=0.0)
ap.add_argument("--chunk-mse", action="store_true")
ap.add_argument("--rescale", type=float, default=0.0)
ap.add_argument("--distill", type=float, default=0.0)
ap.add_argument("--distill-every", type=int, default=6)
a = ap.parse_args()
torch.manual_seed(0)
cfg = preset("smollm2-135m", compression_rate=16)
docs, _ = ingest_corpus("bundled", cfg)
records = [parse_scp_record(r, "r") for r in reconstruction_rows(d for d in docs if not heldout(d))]
held = [d for d in first_articles(docs, 2000) if heldout(d)][:40]
model = ClaraModel.build(cfg)
examples = S.build_examples(records, "scp")
if a.lexical > 0:
    orig_encode = model.encode_texts
    def encode_texts(texts, *, max_len, query=False):
        e = orig_encode(texts, max_len=max_len, query=query)
        if query:
            return e
        emb = model.input_embeddings.weight
        lex = torch.zeros_like(e.memory)
        for i, t in enumerate(model.tokenize_texts(texts, max_len)):
            n = int(e.n_mem[i])
            for j, chunk in enumerate(torch.tensor(t).chunk(n)):
                lex[i, j] = emb[chunk.to(emb.device)].sum(0)
        norms = e.memory.norm(dim=-1, keepdim=True).detach()
        e.memory = e.memory + a.lexical * lex / lex.norm(dim=-1, keepdim=True).clamp(min=1e-6) * norms
        return e
    model.encode_texts = encode_texts
if a.layer > 0:
    # memory from layer N (then the final norm): the compressor runs only the first N layers
    decoder = model.base_model.get_decoder()
    all_layers = decoder.layers
    inner_encode = model.encode_texts
    def encode_texts_layer(texts, *, max_len, query=False):
        decoder.layers = all_layers[: a.layer]
        try:
            return inner_encode(texts, max_len=max_len, query=query)
        finally:
            decoder.layers = all_layers
    model.encode_texts = encode_texts_layer
if a.soft_vocab > 0:
    # memory read through the LM head: each vector becomes the expected input embedding of the tokens the
    # compressor's state predicts (temperature T), which the base generator can read from step 0
    vocab_encode = model.encode_texts
    def encode_texts_soft(texts, *, max_len, query=False):
        e = vocab_encode(texts, max_len=max_len, query=query)
        probs = torch.softmax(model._logits(e.memory) / a.soft_vocab, dim=-1)
        e.memory = (probs.to(model.input_embeddings.weight.dtype) @ model.input_embeddings.weight)
        e.memory = e.memory * torch.arange(e.memory.shape[1]).lt(e.n_mem.unsqueeze(1)).unsqueeze(-1)
        return e
    model.encode_texts = encode_texts_soft
if a.rescale > 0:
    # each memory vector scaled to the input embeddings' mean norm (times R): the last layer's states are ~15x
    # longer than any input embedding, which is what makes untrained memory raise the generator's CE to 10
    emb_norm = model.input_embeddings.weight.norm(dim=-1).mean().item()
    scale_encode = model.encode_texts
    def encode_texts_scaled(texts, *, max_len, query=False):
        e = scale_encode(texts, max_len=max_len, query=query)
        e.memory = e.memory / e.memory.norm(dim=-1, keepdim=True).clamp(min=1e-6) * (a.rescale * emb_norm)
        return e
    model.encode_texts = encode_texts_scaled
if a.chunk_mse:
    # the alignment per slot: memory slot j toward the mean state of the j-th chunk of the passage's tokens
    # (the paper aligns the mean of all slots to the mean of all tokens: one topic vector per passage)
    stash = {}
    inner_decode = model._decode_hidden
    def decode_stash(embeds, mask):
        stash["h"] = inner_decode(embeds, mask)
        return stash["h"]
    model._decode_hidden = decode_stash
    chunk_encode = model.encode_texts
    def encode_texts_chunks(texts, *, max_len, query=False):
        e = chunk_encode(texts, max_len=max_len, query=query)
        if query:
            return e
        h = stash.pop("h")
        target = torch.zeros_like(e.memory)
        for i, t in enumerate(model.tokenize_texts(texts, max_len)):
            for j, idx in enumerate(torch.arange(1, 1 + len(t)).chunk(int(e.n_mem[i]))):
                target[i, j] = h[i, idx].mean(0)
        e.mem_mean, e.text_mean = e.memory, target
        return e
    model.encode_texts = encode_texts_chunks
if a.distill > 0:
    # context distillation: the generator reading the memory is pulled, at every N-th layer and every target
    # position, toward the hidden states of the frozen base reading the raw passage (a dense signal at each
    # layer where the base attends to the passage, where the CE only sees what changes the next token)
    decoder = model.base_model.get_decoder()

    def states(rows, mems):
        embeds, mask, _ = model.embed_prompts(rows, mems, left_pad=False)
        with model.amp():
            out = decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=False, output_hidden_states=True)
        return out.hidden_states

    def positions(prompts_ids, targets):
        b_idx, t_idx = [], []
        for b, (p, t) in enumerate(zip(prompts_ids, targets)):
            b_idx += [b] * len(t); t_idx += [len(p) + j - 1 for j in range(len(t))]
        return torch.tensor(b_idx), torch.tensor(t_idx)

    def distill_loss(model, batch, mse_weight, max_target_len, rng):
        docs = [d for ex in batch for d in ex.docs]
        with model.adapter("compressor"):
            enc = model.encode_texts(docs, max_len=model.cfg.doc_max_len)
        memories = enc.unpad()
        rows, raw_rows, targets, mems, at = [], [], [], [], 0
        for ex in batch:
            ex_mems = memories[at: at + len(ex.docs)]
            raw = "\n\n".join(ex.docs); at += len(ex.docs)
            user = rng.choice(ex.users)
            slots = "".join(model.prompter.placeholders(m.shape[0]) for m in ex_mems)
            rows.append(model.prompter.prompt_ids(user.replace("{documents}", slots), ex.system))
            raw_rows.append(model.prompter.prompt_ids(user.replace("{documents}", raw), ex.system))
            targets.append(model.prompter.target_ids(ex.target, max_target_len)); mems.append(ex_mems)
        with model.adapter("generator"):
            hs = states([r + t for r, t in zip(rows, targets)], mems)
        with torch.no_grad(), model.adapter(None):
            ht = states([r + t for r, t in zip(raw_rows, targets)], [[] for _ in rows])
        bs, ts = positions(rows, targets); bt, tt = positions(raw_rows, targets)
        labels = torch.tensor([x for t in targets for x in t])
        ce = F.cross_entropy(model._logits(hs[-1][bs, ts].to(model.dtype)), labels)
        layers = list(range(a.distill_every, len(hs), a.distill_every))
        dist = sum(((hs[l][bs, ts].float() - ht[l][bt, tt].float()) ** 2).mean() / (ht[l][bt, tt].float() ** 2).mean()
                   for l in layers) / len(layers)
        mse = F.mse_loss(enc.mem_mean.float(), enc.text_mean.float())
        return ce + mse_weight * mse + a.distill * dist, {"ce": ce.item(), "mse": mse.item(), "distill": dist.item()}
    train_loss = distill_loss
else:
    def train_loss(model, batch, mse_weight, max_target_len, rng):
        return S.compressed_lm_loss(model, batch, mse_weight, max_target_len, rng, target_dropout=a.wdrop)
model.set_trainable(["compressor", "generator"], special=True)
groups = [{"params": model._adapter_params["compressor"] + [model.special], "lr": a.clr},
          {"params": model._adapter_params["generator"], "lr": a.glr}]
opt = torch.optim.AdamW(groups, weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, (lambda s: 1.0) if a.const else warmup_cosine(a.steps, 0.03, 0.1))
rng = random.Random(0)
probe_rng = random.Random(123)  # the live control draws its own batches: training sees the same ones as before
model.peft.train()
t0 = time.time(); ces = []
for step in range(a.steps):
    if a.freeze_gen:  # set_trainable, not requires_grad: adapter switches re-apply the trainable set
        model.set_trainable(["compressor"] if step < a.freeze_gen else ["compressor", "generator"], special=True)
    batch = rng.sample(examples, a.bs)
    loss, m = train_loss(model, batch, a.mse, 1024, rng)
    opt.zero_grad(); loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
    opt.step(); sched.step(); ces.append(m["ce"])
    if step % 10 == 0 or step == a.steps - 1:
        # live control on a fresh batch: the same generator reading each passage's own vs a neighbour's memory
        with torch.no_grad():
            probe_batch = probe_rng.sample(examples, 4)
            own, _ = S.compressed_lm_loss(model, probe_batch, 0.0, 1024, random.Random(step))
            from clara.model.memory import Encoded
            saved = Encoded.unpad
            Encoded.unpad = lambda self: (lambda m: m[1:] + m[:1])(saved(self))
            try:
                other, _ = S.compressed_lm_loss(model, probe_batch, 0.0, 1024, random.Random(step))
            finally:
                Encoded.unpad = saved
        print(json.dumps({"step": step, "ce": round(m["ce"], 3), "mse": round(m["mse"], 3),
                          "own": round(own.item(), 3), "other": round(other.item(), 3),
                          "use": round(other.item() - own.item(), 3), "distill": round(m.get("distill", 0), 4), "s": round(time.time() - t0)}), flush=True)
model.set_trainable([], special=False)
probe = reconstruction(model, held)
res = {"name": a.name, **vars(a), "train_s": round(time.time() - t0), **probe,
       "train_ce_last10": sum(ces[-10:]) / 10}
print(json.dumps(res), flush=True)
out = ROOT / "benchmarks" / "results" / "experiments" / "scp_recipe" / f"v_{a.name}.json"
out.write_text(json.dumps(res, indent=1), encoding="utf-8")
