"""Importing the authors' released checkpoints (apple/ml-clara), without the real weights: a release folder in
their exact format is built from the tiny model, and a reference forward written from *their* layout (their token
order with <AE>, a resized embedding matrix, their <ENC><s>text</s> left-padded input, their prompt) must give
the same memory vectors and the same answers as the imported checkpoint."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from clara.config import ALL_LINEAR, preset
from clara.model import ClaraModel
from clara.model.checkpoint import load_checkpoint, read_checkpoint_config
from clara.model.ml_clara import PEFT_PREFIX, ReleaseError, import_ml_clara
from conftest import perturb

N_MEM = 16  # tiny: doc_max_len 256 at rate 16
THEIRS = {"compressor": "encoder_adapter", "generator": "decoder_adapter", "query_reasoner": "query_reasoner_adapter"}
TEXTS = ["Paris is the capital of France. It lies on the Seine.",
         "Short.",
         " ".join(f"word{i}" for i in range(400))]  # longer than 257 tokens: cut, and no </s>


def _release(folder, stage="stage2", adapters=("compressor", "generator", "query_reasoner")):
    """A compression-16 folder as the authors' save_pretrained writes it, from a perturbed tiny model."""
    src = ClaraModel.build(preset("tiny", compression_rate=16))
    perturb(src, seed=3)
    base_emb = src.input_embeddings.weight.detach().clone()
    gen = torch.Generator().manual_seed(5)
    new_rows = torch.randn(N_MEM + 3, base_emb.shape[1], generator=gen)  # <MEM0..15>, <AE>, <ENC>, <SEP>
    lm_head = src.base_model.get_output_embeddings().weight.detach().clone()
    folder.mkdir(parents=True)
    packed = {}
    for ours in adapters:
        state = get_peft_model_state_dict(src.peft, adapter_name=ours)
        packed[THEIRS[ours]] = {k.removeprefix(PEFT_PREFIX): v.clone() for k, v in state.items()}
    if "generator" in adapters:  # PEFT also saves the resized embedding into an adapter's dict: must be ignored
        packed["decoder_adapter"]["model.embed_tokens.weight"] = torch.cat([base_emb, new_rows])
    torch.save(packed, folder / "adapters.pth")
    torch.save({"model.embed_tokens.weight": torch.cat([base_emb, new_rows]),
                "lm_head.weight": torch.cat([lm_head, torch.randn(N_MEM + 3, lm_head.shape[1], generator=gen)])},
               folder / "decoder_first_last_layers.pth")
    (folder / "config.json").write_text(json.dumps({
        "compr_rate": 16, "doc_max_length": 256, "lora": True, "lora_r": src.cfg.lora.r, "training_stage": stage,
        "decoder_model_name": "tiny", "compr_model_name": None, "different_mem_tokens": True, "sep": True,
        "generation_top_k": 5}))
    return packed


class Reference:
    """The authors' forward, written from their layout: their tokenizer order, resized embeddings, adapters by
    their names, <ENC><s>text</s> left-padded to doc_max_length + 3, memory tokens at the end."""

    def __init__(self, folder):
        from clara.model.base import load_base

        self.base, self.tok = load_base("tiny", device=torch.device("cpu"), dtype=torch.float32, seed=0)
        self.vocab = self.base.get_input_embeddings().weight.shape[0]
        self.mem = [f"<MEM{i}>" for i in range(N_MEM)]
        self.tok.add_special_tokens({"additional_special_tokens": self.mem + ["<AE>", "<ENC>", "<SEP>"]},
                                    replace_extra_special_tokens=False)
        layers = torch.load(folder / "decoder_first_last_layers.pth", weights_only=True)
        self.emb = layers["model.embed_tokens.weight"]  # [vocab + n + 3, H]
        adapters = torch.load(folder / "adapters.pth", weights_only=True)
        r = json.loads((folder / "config.json").read_text())["lora_r"]
        lora = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.1, target_modules=list(ALL_LINEAR))
        names = list(adapters)
        self.peft = get_peft_model(self.base, lora, adapter_name=names[0])
        for name in names[1:]:
            self.peft.add_adapter(name, lora)
        for name in names:
            set_peft_model_state_dict(self.peft, {PEFT_PREFIX + k: v for k, v in adapters[name].items()
                                                  if "lora_" in k}, adapter_name=name)
        self.peft.eval()

    def ids(self, token: str) -> int:
        return self.tok.convert_tokens_to_ids(token)

    def hidden(self, ids, mask, embeds=None):
        decoder = self.peft.get_base_model().model
        embeds = self.emb[ids] if embeds is None else embeds
        return decoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state

    @torch.no_grad()
    def encode(self, texts, adapter):
        self.peft.set_adapter(adapter)
        self.tok.padding_side = "left"
        enc = self.tok([f"<ENC>{self.tok.bos_token}{t}{self.tok.eos_token}" for t in texts],
                       add_special_tokens=False, padding="max_length", truncation=True, max_length=256 + 3,
                       return_tensors="pt")
        mem = torch.tensor([[self.ids(m) for m in self.mem]] * len(texts))
        ids = torch.cat([enc["input_ids"], mem], 1)
        mask = torch.cat([enc["attention_mask"], torch.ones_like(mem)], 1)
        return self.hidden(ids, mask)[:, -N_MEM:]

    @torch.no_grad()
    def answer(self, question, memory, steps=8):
        from clara.model import prompts

        self.peft.set_adapter("decoder_adapter")
        docs = "".join(self.mem) + "<SEP>"
        text = self.tok.apply_chat_template(
            prompts.chat(prompts.QA_SYSTEM, f"Background:\n{docs}\n\nQuestion:{question}"), tokenize=False,
            add_generation_prompt=True)
        ids = self.tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        first = int((ids[0] == self.ids("<MEM0>")).nonzero()[0])
        out = []
        for _ in range(steps):
            embeds = self.emb[ids].clone()
            embeds[0, first:first + N_MEM] = memory
            h = self.hidden(ids, torch.ones_like(ids), embeds)[:, -1]
            logits = self.peft.get_base_model().lm_head(h)[0, : self.vocab]  # never a special token
            nxt = int(logits.argmax())
            if nxt == self.tok.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        return self.tok.decode(out, skip_special_tokens=True).strip()


def _imported(tmp_path, **release):
    folder = tmp_path / "CLaRa-tiny" / "compression-16"
    _release(folder, **release)
    out = import_ml_clara(folder, tmp_path / "ckpt")
    model = load_checkpoint(out)
    model.uses_amp = False  # compare in fp32: the reference runs without autocast
    return folder, out, model


def test_import_round_trip_gives_the_authors_memories_queries_and_answers(tmp_path):
    folder, out, model = _imported(tmp_path)
    ref = Reference(folder)
    meta = read_checkpoint_config(out)
    assert meta["model"]["layout"] == "ml-clara" and meta["extra"]["query_reasoner"] == "imported"
    assert meta["extra"]["training_stage"] == "stage2"

    ours = torch.stack(model.compress(TEXTS))
    theirs = ref.encode(TEXTS, "encoder_adapter")
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    q = ["What is the capital of France?"]
    assert torch.allclose(model.encode_queries(q)[0], ref.encode(q, "query_reasoner_adapter")[0], atol=1e-4)
    for text, mem in zip(TEXTS[:2], ours):
        assert model.generate(q, [[mem]], max_new_tokens=8)[0] == ref.answer(q[0], mem)


def test_a_checkpoint_without_a_query_reasoner_gets_a_compressor_copy_and_says_so(tmp_path):
    _, out, model = _imported(tmp_path, stage="stage1", adapters=("compressor", "generator"))
    assert "copy of the compressor" in read_checkpoint_config(out)["extra"]["query_reasoner"]
    assert torch.allclose(torch.stack(model.encode_queries(["x"])), torch.stack(model.compress(["x"])), atol=1e-5)


def test_an_incomplete_or_missing_adapter_is_a_clear_error(tmp_path):
    folder = tmp_path / "r1"
    _release(folder, stage="stage1_2", adapters=("compressor",))  # the decoder adapter the authors' loader drops
    with pytest.raises(ReleaseError, match="stage1_2 checkpoint needs encoder_adapter, decoder_adapter; missing "
                                           "decoder_adapter"):
        import_ml_clara(folder, tmp_path / "o1")
    folder = tmp_path / "r2"
    packed = _release(folder)
    dropped = next(k for k in packed["decoder_adapter"] if "layers.1.mlp.down_proj.lora_B" in k)
    del packed["decoder_adapter"][dropped]
    torch.save(packed, folder / "adapters.pth")
    with pytest.raises(ReleaseError, match=r"decoder_adapter does not fit .* 1 of \d+ LoRA tensors missing "
                                           r"\(e\.g\. model\.layers\.1\.mlp\.down_proj\.lora_B"):
        import_ml_clara(folder, tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


class Payload:
    """Not a tensor: unpickling this would run code of ours."""

    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_a_pickle_that_is_not_plain_tensors_is_refused(tmp_path, capsys):
    folder = tmp_path / "r"
    _release(folder)
    with open(folder / "adapters.pth", "wb") as f:
        pickle.dump({"encoder_adapter": Payload()}, f)
    torch.save({"encoder_adapter": {"x": torch.zeros(1)}, "decoder_adapter": [torch.zeros(1)]},
               tmp_path / "list.pth")
    with pytest.raises(ReleaseError, match="refused: it holds more than plain tensors"):
        import_ml_clara(folder, tmp_path / "o")
    assert "pickled code ran" not in capsys.readouterr().out
    from clara.model.ml_clara import read_tensors

    with pytest.raises(ReleaseError, match=r"\['decoder_adapter'\] is a list, not a tensor"):
        read_tensors(tmp_path / "list.pth")


def test_weights_of_another_base_are_refused(tmp_path):
    folder = tmp_path / "r"
    _release(folder)
    layers = torch.load(folder / "decoder_first_last_layers.pth", weights_only=True)
    layers["model.embed_tokens.weight"][7] += 1.0
    torch.save(layers, folder / "decoder_first_last_layers.pth")
    with pytest.raises(ReleaseError, match="rows of the base vocabulary differ"):
        import_ml_clara(folder, tmp_path / "o")


def test_the_cli_imports_a_release(tmp_path):
    from typer.testing import CliRunner

    from clara.cli import app

    folder = tmp_path / "r"
    _release(folder)
    res = CliRunner().invoke(app, ["import", "ml-clara", str(folder), "--out", str(tmp_path / "ckpt")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["import", "ml-clara", str(tmp_path), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "missing config.json" in res.output
