"""Run by ``torchrun`` from test_distributed.py: SCP then E2E on the tiny model, then each rank writes what it
holds (a fingerprint of its trainable weights, the examples it saw first) for the test to compare."""

import hashlib
import json
import sys
from pathlib import Path

import torch

from clara.config import E2EConfig, SCPConfig, TrainConfig, preset
from clara.data.records import QARecord, load_scp_records
from clara.model import ClaraModel
from clara.training.common import batch_indices
from clara.training.distributed import setup
from clara.training.e2e import train_e2e
from clara.training.scp import train_scp


def fingerprint(model) -> str:
    h = hashlib.sha256()
    for p in model.trainable_parameters():
        h.update(p.detach().float().cpu().numpy().round(5).tobytes())
    return h.hexdigest()


def main(fixtures: Path, out: Path) -> None:
    torch.manual_seed(0)
    dist = setup()
    train = TrainConfig(batch_size=4, max_steps=3, checkpoint_every=2, log_every=1)
    model = ClaraModel.build(preset("tiny", compression_rate=16))
    records = load_scp_records(fixtures / "scp.jsonl")
    train_scp(model, records, SCPConfig(model=model.cfg, train=train), out / "scp", progress=False)
    scp_print = fingerprint(model)
    corpus = {f"d{i}": text for i, text in enumerate(
        ["Paris is the capital of France.", "The Nile flows into the Mediterranean Sea.",
         "Python is a programming language.", "Mount Everest is the highest mountain."])}
    qa = [QARecord(f"q{i}", q, [a], [f"d{i}"]) for i, (q, a) in enumerate(
        [("What is the capital of France?", "Paris"), ("Where does the Nile flow?", "the Mediterranean Sea"),
         ("What is Python?", "a programming language"), ("What is the highest mountain?", "Mount Everest")])]
    train_e2e(model, qa, corpus, E2EConfig(train=train, n_candidates=2, top_k=1), out / "e2e", progress=False)
    first = dist.shard(batch_indices(0, 0, train, len(records)))
    (out / f"rank-{dist.rank}.json").write_text(json.dumps(
        {"world": dist.world, "scp": scp_print, "e2e": fingerprint(model), "first_batch": first}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
