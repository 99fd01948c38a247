import math

import pytest
import torch

from clara.config import COMPRESSION_RATES, preset
from clara.model import ADAPTERS, ClaraModel
from clara.model.memory import compression_stats

from conftest import perturb


@pytest.fixture(scope="module")
def models():
    """One tiny model per (rate, mode); building is cheap once peft is imported."""
    cache = {}

    def get(rate, mode):
        if (rate, mode) not in cache:
            m = ClaraModel.build(preset("tiny", compression_rate=rate, length_mode=mode))
            perturb(m)
            cache[(rate, mode)] = m
        return cache[(rate, mode)]

    return get


@pytest.mark.parametrize("mode", ["fixed", "proportional"])
@pytest.mark.parametrize("rate", COMPRESSION_RATES)
def test_compress_shapes_and_real_ratio(models, docs, rate, mode):
    model = models(rate, mode)
    mems = model.compress(docs)
    lengths = [len(t) for t in model.tokenize_texts(docs, model.cfg.doc_max_len)]
    for m, n_tok in zip(mems, lengths):
        expected = 256 // rate if mode == "fixed" else max(1, math.ceil(n_tok / rate))
        assert m.shape == (expected, 64)
        assert torch.isfinite(m).all()
    stats = compression_stats(model.cfg, lengths)
    assert stats["nominal_rate"] == rate
    assert stats["real_ratio"] == pytest.approx(sum(lengths) / sum(m.shape[0] for m in mems))
    # A query covers every slot a document can use, whatever the mode.
    q = model.encode_queries(["Where is Paris?"])[0]
    assert q.shape == (model.cfg.n_mem_max, 64)


@pytest.mark.parametrize("mode", ["fixed", "proportional"])
def test_batched_compression_equals_one_at_a_time(models, docs, mode):
    model = models(16, mode)
    together = model.compress(docs, batch_size=8)
    for doc, m in zip(docs, together):
        alone = model.compress([doc])[0]
        assert torch.allclose(alone, m, atol=1e-5)


def test_documents_are_truncated_to_max_len(tiny_model):
    long_doc = "word " * 2000
    n_tok = len(tiny_model.tokenize_texts([long_doc], tiny_model.cfg.doc_max_len)[0])
    assert n_tok == tiny_model.cfg.doc_max_len
    assert tiny_model.compress([long_doc])[0].shape[0] == tiny_model.cfg.n_mem_max


def test_three_adapters_are_distinct_and_switchable(tiny_model, docs):
    outs = {}
    with torch.no_grad():
        for name in (*ADAPTERS, None):
            with tiny_model.adapter(name):
                outs[name] = tiny_model.encode_texts(docs[:1], max_len=64).memory
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(outs[a], outs[b]), f"{a} and {b} gave the same states"
    # The context manager restores the previously active adapter.
    before = tiny_model.peft.active_adapter
    with tiny_model.adapter("generator"):
        assert tiny_model.peft.active_adapter == "generator"
    assert tiny_model.peft.active_adapter == before
    with pytest.raises(ValueError, match="unknown adapter"):
        with tiny_model.adapter("retriever"):
            pass


def test_query_reasoner_copy_of_compressor_encodes_like_a_document(tiny_model):
    tiny_model.copy_adapter("compressor", "query_reasoner")
    text = ["Who wrote Hamlet?"]
    assert torch.allclose(tiny_model.compress(text)[0], tiny_model.encode_queries(text)[0], atol=1e-6)


def test_only_chosen_adapters_and_special_rows_train(tiny_model):
    base_before = {n: p.clone() for n, p in tiny_model.peft.named_parameters() if "lora_" not in n}
    tiny_model.set_trainable(["compressor", "generator"], special=True)
    trainable = {id(p) for p in tiny_model.trainable_parameters()}
    for name, p in tiny_model.peft.named_parameters():
        if "lora_" not in name:
            assert not p.requires_grad, name
        else:
            assert p.requires_grad == (".query_reasoner." not in name), name
            assert p.requires_grad == (id(p) in trainable)
    assert tiny_model.special.requires_grad
    # Switching adapters (peft flips requires_grad on set_adapter) must not change the policy.
    with tiny_model.adapter("query_reasoner"):
        assert not any(p.requires_grad for n, p in tiny_model.peft.named_parameters() if ".query_reasoner." in n)
    # A backward pass through compressor + generator reaches the special rows but not the base.
    from clara.training.scp import Example, compressed_lm_loss
    import random

    ex = Example(["Paris is in France."], ("Background:\n{documents} means the same as",), "Paris is in France.")
    loss, parts = compressed_lm_loss(tiny_model, [ex], 0.1, 32, random.Random(0))
    loss.backward()
    assert tiny_model.special.grad is not None and tiny_model.special.grad.abs().sum() > 0
    assert parts["ce"] > 0 and parts["mse"] > 0
    for n, p in tiny_model.peft.named_parameters():
        if "lora_" not in n:
            assert p.grad is None and torch.equal(p, base_before[n])


def test_a_pass_by_the_bare_base_keeps_every_trainable_adapters_gradients(tiny_model, docs):
    """A teacher pass by the bare base (``adapter(None)``) between the forward and the backward: peft's
    re-enabling flips requires_grad to the active adapter only, and autograd would then drop the gradients of
    the other trained adapters."""
    tiny_model.set_trainable(["compressor", "generator"], special=False)
    for p in tiny_model.trainable_parameters():
        p.grad = None
    with tiny_model.adapter("compressor"):
        mem = tiny_model.encode_texts(docs[:1], max_len=64).memory
    with tiny_model.adapter("generator"):
        out = tiny_model.encode_texts(docs[1:2], max_len=64).memory
    with torch.no_grad(), tiny_model.adapter(None):
        tiny_model.encode_texts(docs[:1], max_len=64)
    (mem.sum() + out.sum()).backward()
    for name in ("compressor", "generator"):
        assert all(p.requires_grad for p in tiny_model._adapter_params[name]), name
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model._adapter_params[name]), name
    tiny_model.set_trainable([])


def test_special_rows_do_not_touch_the_base_embedding(tiny_model):
    emb = tiny_model.input_embeddings.weight
    ids = torch.tensor([[tiny_model.enc_id, tiny_model.mem_ids[0], 5]])
    out = tiny_model.embed(ids)
    assert torch.equal(out[0, 0], tiny_model.special[-2].to(out.dtype))
    assert torch.equal(out[0, 1], tiny_model.special[0].to(out.dtype))
    assert torch.equal(out[0, 2], emb[5])
    assert emb.shape[0] <= tiny_model.first_special_id  # no resize of the base vocabulary


def test_generate_batched_equals_single(tiny_model, docs):
    mems = tiny_model.compress(docs)
    questions = ["Where is Paris?", "Which river?", "What is Python?"]
    memories = [[mems[0]], [mems[1], mems[0]], [mems[2], mems[1], mems[0]]]
    together = tiny_model.generate(questions, memories, max_new_tokens=6)
    for q, m, t in zip(questions, memories, together):
        assert tiny_model.generate([q], [m], max_new_tokens=6)[0] == t


def test_generation_stops_at_eos_and_never_emits_special_tokens(tiny_model, docs):
    mem = tiny_model.compress(docs[:1])
    row = [tiny_model.prompter.qa_prompt("Where?", [mem[0].shape[0]])]
    with tiny_model.adapter("generator"):
        free = tiny_model.greedy_decode(row, [mem], max_new_tokens=12)[0]
    assert len(free) == 12
    assert all(t < tiny_model.first_special_id for t in free)
    # Declare the 4th generated token to be EOS: decoding must stop right there and drop it.
    stop = free[3]
    with tiny_model.adapter("generator"):
        stopped = tiny_model.greedy_decode(row, [mem], max_new_tokens=12, eos_token_id=stop)[0]
    assert stopped == free[: free.index(stop)]
    # Timing: the first token comes after prefill, the rest are decoding; EOS counts as a produced token.
    from clara.model.decoding import Timing

    t = Timing()
    with tiny_model.adapter("generator"):
        tiny_model.greedy_decode(row, [mem], max_new_tokens=12, timing=t)
    assert t.new_tokens == 12 and 0 < t.first_token_s <= t.total_s and t.decode_tokens_per_s > 0
    t = Timing()
    with tiny_model.adapter("generator"):
        tiny_model.greedy_decode(row, [mem], max_new_tokens=12, eos_token_id=stop, timing=t)
    assert t.new_tokens == free.index(stop) + 1


def test_prompt_memory_mismatch_is_an_error(tiny_model, docs):
    mem = tiny_model.compress(docs[:1])[0]
    row = tiny_model.prompter.qa_prompt("q", [mem.shape[0] - 1])
    with pytest.raises(ValueError, match="memory slots"):
        tiny_model.embed_prompts([row], [[mem]], left_pad=True)
    with pytest.raises(ValueError, match="memory tokens at this rate"):
        tiny_model.prompter.qa_prompt("q", [mem.shape[0] + 1])


def test_raw_text_baseline_and_paraphrase(tiny_model, docs):
    answers = tiny_model.generate_from_text(["Where is Paris?"], [docs[:2]], max_new_tokens=4)
    assert len(answers) == 1 and isinstance(answers[0], str)
    para = tiny_model.paraphrase(tiny_model.compress(docs[:2]), max_new_tokens=4)
    assert len(para) == 2


def test_single_string_is_rejected(tiny_model):
    with pytest.raises(TypeError):
        tiny_model.compress("just one string")


def test_a_chat_template_without_a_system_role_gets_the_system_text_in_the_user_turn(tiny_model):
    # Mistral-7B-Instruct-v0.2's template raises on a system message; our prompts must still build.
    tok = tiny_model.tokenizer
    saved = tok.chat_template
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('Conversation "
                         "roles must alternate user/assistant') }}{% endif %}[INST] {{ m['content'] }} [/INST]"
                         "{% endfor %}")
    try:
        ids = tiny_model.prompter.prompt_ids("What is it?", "Answer briefly.")
        text = tok.decode(ids)
        assert "Answer briefly." in text and "What is it?" in text and text.index("Answer") < text.index("What")
        assert tok.decode(tiny_model.prompter.prompt_ids("What is it?")).count("[INST]") == 1
    finally:
        tok.chat_template = saved


def test_vocab_readout_is_the_expected_embedding_of_the_states_prediction(docs):
    """``memory_readout="vocab"``: each used slot is softmax(LM head(state) / T) @ E (a point in the convex hull
    of the input embeddings); unused slots stay zero; the MSE alignment still sees the states; gradients reach
    the compressor through the readout."""
    states_model = ClaraModel.build(preset("tiny", compression_rate=16, length_mode="proportional"))
    vocab_model = ClaraModel.build(preset("tiny", compression_rate=16, length_mode="proportional",
                                          memory_readout="vocab", readout_temperature=0.5))
    perturb(states_model)
    perturb(vocab_model)
    with torch.no_grad(), states_model.adapter("compressor"), vocab_model.adapter("compressor"):
        s = states_model.encode_texts(docs, max_len=256)
        v = vocab_model.encode_texts(docs, max_len=256)
    emb = vocab_model.input_embeddings.weight
    for i, n in enumerate(s.n_mem.tolist()):
        expected = torch.softmax(vocab_model._logits(s.memory[i, :n]) / 0.5, dim=-1) @ emb
        assert torch.allclose(v.memory[i, :n], expected, atol=1e-5)
        assert not v.memory[i, n:].any()
    assert (v.memory.norm(dim=-1) <= emb.norm(dim=-1).max() + 1e-5).all()
    assert torch.allclose(v.mem_mean, s.mem_mean) and torch.allclose(v.text_mean, s.text_mean)
    # the readout is differentiable: the compressor learns through it
    vocab_model.set_trainable(["compressor"], special=True)
    with vocab_model.adapter("compressor"):
        vocab_model.encode_texts(docs[:2], max_len=256).memory.square().sum().backward()
    grads = [p.grad for p in vocab_model._adapter_params["compressor"] if p.grad is not None]
    assert grads and any(bool(g.abs().sum() > 0) for g in grads)


def test_memory_readout_is_validated():
    with pytest.raises(ValueError, match="memory_readout"):
        preset("tiny", memory_readout="logits")
    with pytest.raises(ValueError, match="readout_temperature"):
        preset("tiny", memory_readout="vocab", readout_temperature=0.0)


def test_merged_copies_answer_and_retrieve_exactly_as_the_adapters(docs):
    """The served fast path: the generator, the query reasoner and the bare base (raw text) run from plain copies of
    the base with their LoRA merged in; in fp32 the greedy answers and the query tensors are the unmerged ones. The
    compressor keeps its adapter; checkpoints and parameter lists never see the copies; training bypasses them."""
    model = ClaraModel.build(preset("tiny", compression_rate=16))
    perturb(model)
    mems = model.compress(docs)
    questions = ["Where is Paris?", "Which river flows north?", "What is Python?"]
    plain = model.generate(questions, [[m] for m in mems], max_new_tokens=12)
    texts = model.paraphrase(mems, max_new_tokens=12)
    raw = model.generate_from_text(questions, [[d] for d in docs], max_new_tokens=12)
    queries = model.encode_queries(questions)
    n_params, keys = len(list(model.parameters())), set(model.state_dict())
    model.merge_adapters(["generator", "query_reasoner", None])
    assert model.merged_adapters == ["generator", "query_reasoner", None]
    assert len(list(model.parameters())) == n_params and set(model.state_dict()) == keys  # not submodules
    assert model.generate(questions, [[m] for m in mems], max_new_tokens=12) == plain
    assert model.paraphrase(mems, max_new_tokens=12) == texts
    assert model.generate_from_text(questions, [[d] for d in docs], max_new_tokens=12) == raw
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(model.encode_queries(questions), queries))
    assert all(torch.equal(a, b) for a, b in zip(model.compress(docs), mems))  # compressor untouched
    with torch.no_grad():
        merged = model._merged.get("query_reasoner")
    assert merged is not None and not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.enable_grad(), model.adapter("query_reasoner"):  # training runs the adapter, not the snapshot
        model.set_trainable(["query_reasoner"])
        enc = model.encode_texts(questions[:1], max_len=model.cfg.query_max_len, query=True)
        enc.memory.sum().backward()
    assert any(p.grad is not None for p in model.trainable_parameters())
    model.unmerge_adapters()
    assert model.merged_adapters == []
    with pytest.raises(ValueError, match="unknown adapter"):
        model.merge_adapters(["decoder"])


def test_the_cached_system_prefix_decodes_exactly_as_a_full_prefill(docs, monkeypatch):
    """The served path's prefix cache (the QA prompt's fixed system turn prefilled once): the same logits at every
    decoding step and the same greedy answers, for CLaRa and the raw-text baseline, for batches whose rows differ in
    length (padding then sits between the prefix and the rest), merged or not; the prefix is computed once per
    adapter and reused. (Greedy answers of a random tiny model hardly depend on positions: the logits are compared
    too, so a position off by the prefix's length fails.)"""
    from clara.model import clara_model, decoding

    model = ClaraModel.build(preset("tiny", compression_rate=16))
    perturb(model)
    seen: list[torch.Tensor] = []

    def recording(lm, *args, **kwargs):
        def call(**kw):
            out = lm(**kw)
            seen.append(out.logits[:, -1].detach().clone())
            return out
        return decoding.greedy_decode(call, *args, **kwargs)

    monkeypatch.setattr(clara_model, "greedy_decode", recording)

    def logits(fn, *args):
        seen.clear()
        answers = fn(*args, max_new_tokens=6)
        return answers, torch.stack([x.float() for x in seen])

    mems = model.compress(docs)
    questions = ["Where is Paris?", "Which river flows north into the sea?", "What is Python?"]
    sets = [[mems[0]], [mems[1], mems[2]], [mems[2]]]  # rows of different lengths
    texts = [[docs[0]], [docs[1], docs[2]], []]  # the last one closed book
    runs = [(model.generate, questions, sets), (model.generate_from_text, questions, texts),
            (model.generate, questions[:1], sets[:1])]
    before = [logits(*run) for run in runs]
    model.cache_prefix()
    assert model._prefix_cache.prefixes and all(len(p) >= 5 for p in model._prefix_cache.prefixes)
    for _ in range(2):  # the second time from the stored prefix, which decoding must not have consumed
        for run, (answers, want) in zip(runs, before):
            got_answers, got = logits(*run)
            assert got_answers == answers and torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert len(model._prefix_cache) == 2  # generator and bare base: one prefix each, reused
    model.merge_adapters(["generator", None])
    for run, (answers, want) in zip(runs, before):
        got_answers, got = logits(*run)
        assert got_answers == answers and torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_merged_generator_under_bf16_matches_to_bf16_rounding(docs):
    """Under bf16 autocast W·x + B(A·x) and (W + BA)·x round differently, so on a random tiny model (near-tied
    logits) a greedy token can flip; the logits themselves agree to bf16 precision."""
    model = ClaraModel.build(preset("tiny", compression_rate=16, amp="bf16"))
    perturb(model)
    mems = model.compress(docs)
    rows = [model.prompter.qa_prompt("Where is Paris?", [mems[0].shape[0]])]
    embeds, mask, _ = model.embed_prompts(rows, [[mems[0]]], left_pad=True)
    with torch.no_grad(), model.adapter("generator"), model.amp():
        plain = model.base_model(inputs_embeds=embeds, attention_mask=mask).logits.float()
    queries = model.encode_queries(["Where is Paris?", "What is Python?"])
    model.merge_adapters()
    for a, b in zip(model.encode_queries(["Where is Paris?", "What is Python?"]), queries):
        assert a.dtype == b.dtype and torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    with torch.no_grad(), model.amp():
        copy = model._merged.get("generator")
        # on a CPU the decoding copies stay fp32 (its bf16 kernels decode slower), the query reasoner's is bf16
        assert copy.dtype == torch.float32 and model._merged.get("query_reasoner").dtype == torch.bfloat16
        merged = copy(inputs_embeds=embeds.to(copy.dtype), attention_mask=mask).logits.float()
    scale = plain.abs().max()
    assert (merged - plain).abs().max() <= 0.03 * scale
    assert (merged[0, -1].argmax() == plain[0, -1].argmax()) or (plain[0, -1].topk(2).values.diff().abs() < 0.03 * scale)


def test_a_prefill_twin_hands_its_cache_to_the_decoding_copy(docs):
    """The served decoding on a CPU: a bf16 twin's layers run the prompt, the fp32 copy's head gives the first
    token and its layers decode from the twin's cache, cast to fp32. With an fp32 twin (the same weights, the same
    dtype) every token must equal plain decoding: the handoff itself (cache, positions, padding, prefix) is exact."""
    import copy
    from types import SimpleNamespace

    from clara.model import decoding

    model = ClaraModel.build(preset("tiny", compression_rate=16, amp="bf16"))
    perturb(model)
    mems = model.compress(docs)
    model.merge_adapters(["generator", "query_reasoner", None])
    with torch.no_grad():
        assert model._merged.prefill("generator").dtype == torch.bfloat16
        assert model._merged.prefill(None).dtype == torch.bfloat16
        assert model._merged.prefill("query_reasoner") is None  # already bf16: one copy does both
        lm = model._merged.get("generator")
    questions = ["Where is Paris?", "Which river flows north?"]
    rows = [model.prompter.qa_prompt(q, [m.shape[0]]) for q, m in zip(questions, mems)]
    embeds, mask, _ = model.embed_prompts(rows, [[m] for m in mems[:2]], left_pad=True)
    class Recording:  # the decoding copy, keeping the logits of every step (random tiny models' greedy tokens
        dtype = lm.dtype  # hardly depend on positions: compare the logits)

        def __init__(self):
            self.seen = []

        def __call__(self, **kw):
            return self.keep(lm(**kw))

        def keep(self, out):
            self.seen.append(out.logits[:, -1].clone())
            return out

        def get_output_embeddings(self):
            return lambda h: self.keep(SimpleNamespace(logits=lm.get_output_embeddings()(h))).logits

    args = (lambda ids: model.embed(ids).to(lm.dtype), embeds.to(lm.dtype), mask, 8, [-1])
    plain, handed = Recording(), Recording()
    tokens = decoding.greedy_decode(plain, *args)
    assert decoding.greedy_decode(handed, *args, prefill=copy.deepcopy(lm)) == tokens
    assert len(handed.seen) == len(plain.seen) == 8
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(handed.seen, plain.seen))
    model.cache_prefix()
    answers = model.generate(["Where is Paris?", "Which river flows north?"], [[m] for m in mems[:2]],
                             max_new_tokens=8)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_a_built_model_is_in_eval_mode_and_inference_keeps_each_mode(docs):
    from clara.config import preset

    model = ClaraModel.build(preset("tiny", compression_rate=16))
    assert not any(m.training for m in model.modules())  # no dropout, and no mode walk per call
    calls = []
    original = type(model.peft).train
    model.peft.train = lambda mode=True: (calls.append(mode), original(model.peft, mode))[1]
    mem = model.compress(docs[:1])[0]
    model.generate(["Where?"], [[mem]], max_new_tokens=2)
    assert calls == [] and not model.peft.training
    model.peft.train()  # as a trainer does: inference calls inside training switch to eval and back
    calls.clear()
    model.compress(docs[:1])
    assert model.peft.training and calls == [False, True]
