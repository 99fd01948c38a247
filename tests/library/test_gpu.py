"""The GPU path: bf16 by default on CUDA, a training step and compression. Skipped without a CUDA device."""

import random

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_tiny_on_gpu_in_bf16_trains_and_compresses(docs):
    from clara.config import preset
    from clara.model import ClaraModel
    from clara.training.scp import Example, compressed_lm_loss

    model = ClaraModel.build(preset("tiny", compression_rate=16, device="cuda"))
    assert model.dtype == torch.bfloat16 and model.device.type == "cuda"
    # Trainable weights stay fp32 on a bf16 base.
    model.set_trainable(["compressor", "generator"], special=True)
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    ex = Example([docs[0]], ("Background:\n{documents} means the same as",), docs[0])
    loss, _ = compressed_lm_loss(model, [ex, ex], 0.1, 64, random.Random(0))
    loss.backward()
    assert torch.isfinite(loss)
    mems = model.compress(docs)
    assert all(m.shape == (16, 64) and m.device.type == "cuda" for m in mems)
