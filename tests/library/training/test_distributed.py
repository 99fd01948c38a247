"""Data-parallel training under torchrun: two CPU processes (Gloo) stay in sync and only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clara.training.distributed import Dist

pytestmark = pytest.mark.slow


def test_shard_splits_a_global_batch_evenly():
    assert Dist(0, 2).shard([5, 6, 7, 8]) == [5, 7] and Dist(1, 2).shard([5, 6, 7, 8]) == [6, 8]
    assert Dist().shard([1, 2, 3]) == [1, 2, 3]
    with pytest.raises(ValueError, match="not divisible"):
        Dist(0, 2).shard([1, 2, 3])


def test_two_processes_under_torchrun_train_identical_weights(tmp_path, fixtures):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__).with_name("ddp_worker.py")), str(fixtures), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    # the failing rank's own error, not only the launcher's tail (which blames the rank that was still waiting)
    errors = "\n".join(line for line in proc.stderr.splitlines() if "Error" in line)
    assert proc.returncode == 0, errors[-3000:] + "\n...\n" + proc.stderr[-1500:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert not set(ranks[0]["first_batch"]) & set(ranks[1]["first_batch"])  # each saw different examples
    assert ranks[0]["scp"] == ranks[1]["scp"] and ranks[0]["e2e"] == ranks[1]["e2e"]  # gradients averaged
    for stage in ("scp", "e2e"):
        lines = (tmp_path / stage / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]  # rank 0 alone logs, once per step
        assert (tmp_path / stage / "model" / "clara.json").is_file()
