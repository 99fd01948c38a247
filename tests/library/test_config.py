import json
import math

import pytest

from clara.config import (COMPRESSION_RATES, E2EConfig, ModelConfig, SCPConfig, from_dict, preset, read_config_file,
                          to_dict)


@pytest.mark.parametrize("rate", COMPRESSION_RATES)
def test_fixed_mode_gives_max_len_over_rate(rate):
    cfg = ModelConfig(base="tiny", compression_rate=rate, doc_max_len=256)
    assert cfg.n_mem_max == 256 // rate
    assert cfg.n_mem_for(3) == cfg.n_mem_for(1000) == 256 // rate


@pytest.mark.parametrize("rate", COMPRESSION_RATES)
def test_proportional_mode_is_ceil_tokens_over_rate(rate):
    cfg = ModelConfig(base="tiny", compression_rate=rate, doc_max_len=256, length_mode="proportional")
    for n in (1, 5, 17, 100, 256, 5000):
        assert cfg.n_mem_for(n) == max(1, math.ceil(min(n, 256) / rate))


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="compression_rate"):
        ModelConfig(compression_rate=8)
    with pytest.raises(ValueError, match="length_mode"):
        ModelConfig(length_mode="banana")
    with pytest.raises(ValueError, match="doc_max_len"):
        ModelConfig(compression_rate=256, doc_max_len=128)
    with pytest.raises(ValueError, match="top_k"):
        E2EConfig(n_candidates=3, top_k=5)
    with pytest.raises(ValueError, match="tau"):
        E2EConfig(tau=0)


def test_presets():
    assert preset("tiny").base == "tiny"
    assert preset("smollm2-135m").base == "smollm2-135m"
    assert "Mistral-7B" in preset("mistral-7b").base
    assert preset("/models/phi-4-mini").base == "/models/phi-4-mini"
    assert preset("tiny", compression_rate=4).n_mem_max == 64


def test_config_round_trip_and_unknown_keys(tmp_path):
    cfg = SCPConfig(model=preset("tiny", compression_rate=32))
    path = tmp_path / "c.json"
    path.write_text(json.dumps(to_dict(cfg)))
    again = from_dict(SCPConfig, read_config_file(path))
    assert again == cfg
    path.write_text(json.dumps({"model": {"bsae": "tiny"}}))
    with pytest.raises(ValueError, match="unknown ModelConfig field.*bsae"):
        from_dict(SCPConfig, read_config_file(path))
    toml = tmp_path / "c.toml"
    toml.write_text('mse_weight = 0.5\n[train]\nbatch_size = 2\n[train.optim]\nlr = 0.001\n')
    cfg = from_dict(SCPConfig, read_config_file(toml))
    assert cfg.mse_weight == 0.5 and cfg.train.batch_size == 2 and cfg.train.optim.lr == 0.001
    toml.write_text("mse_weight = ")
    with pytest.raises(ValueError, match="not valid TOML"):
        from_dict(SCPConfig, read_config_file(toml))


def test_e2e_learning_rate_default_survives_partial_train_settings():
    assert E2EConfig().train.optim.lr == 1e-4
    assert E2EConfig(train={"batch_size": 2}).train.optim.lr == 1e-4
    assert E2EConfig(train={"optim": {"lr": 1e-3}}).train.optim.lr == 1e-3
