"""``make pipeline``'s last step: run deployment ``clara/full-pipeline`` with the Prefect CLI, wait for it, then
print the run's evaluation artifact, its wall time and where to look next.

    python -m clara_flows.run [--param KEY=VALUE ...]    # extra parameters go to `prefect deployment run`
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path


async def _run_facts(flow_run_id: str) -> tuple[str | None, str | None]:
    """The run's evaluation artifact and the MLflow experiment it recorded to (its ``execution.experiment``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=["clara-evaluation"])))
        parameters = (await client.read_flow_run(flow_run_id)).parameters
    execution = parameters.get("execution") if isinstance(parameters.get("execution"), dict) else {}
    return (found[0].data if found else None), execution.get("experiment")


def main(argv: list[str]) -> int:
    prefect = str(Path(sys.executable).with_name("prefect"))
    cmd = [prefect, "deployment", "run", "clara/full-pipeline", "--watch", *argv]
    print("$ prefect", " ".join(cmd[1:]), flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    flow_run_id = None
    for line in proc.stdout:  # type: ignore[union-attr]
        sys.stdout.write(line)
        m = re.search(r"UUID:\s*([0-9a-f-]{36})", line)
        flow_run_id = flow_run_id or (m.group(1) if m else None)
    rc = proc.wait()
    wall = time.perf_counter() - started
    summary, experiment = asyncio.run(_run_facts(flow_run_id)) if flow_run_id else (None, None)
    if summary:
        print("\n" + summary)
    api = os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api").removesuffix("/api")
    print(f"wall time: {wall / 60:.1f} min ({wall:.0f} s); exit status {rc}")
    print(f"Prefect UI: {api}/runs/flow-run/{flow_run_id}" if flow_run_id else f"Prefect UI: {api}")
    print(f"MLflow UI:  {_experiment_link(experiment)}")
    return rc


def _experiment_link(name: str | None) -> str:
    """Experiment ``name``'s runs (the default one when the run named none) in MLflow's model-training view, or
    the server's address if it cannot be asked."""
    from clara_flows import tracking

    try:
        c = tracking.client()
        exp = c.get_experiment_by_name(name or tracking.EXPERIMENT)
    except Exception:  # the server is down: the run's own output already says what failed
        exp = None
    return tracking.experiment_url(exp.experiment_id) if exp is not None else tracking.tracking_uri()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
