"""The served production model under load: ``mlflow models serve`` on 127.0.0.1, N concurrent clients for a fixed
time each, then malformed requests. Needs the services' environment (the tracking server holding the model):

    eval "$(python -m clara_infra.services env)"
    python benchmarks/load.py [--model models:/clara@production] [--clients 1,4,16] [--seconds 60]
                              [--out benchmarks/results/load.json]

or, with no services, a checkpoint over a build of bundled passages (``--checkpoint``), served unmerged and then
merged in the same run (``--compare-merge``):

    python benchmarks/load.py --checkpoint releases/clara-smollm2-r16 --compare-merge --seconds 30

Per client count: completed requests/s, latency p50/p95/p99, errors (any non-200: must be 0), and the throughput
ratio against one client measured in the same run. The server's resident memory (the serve process and its
workers) is sampled every second: after the warm-up, the peak and the last sample of each level, after the
malformed requests, and the whole series (``rss_series``: seconds since the warm-up, MiB). ``--arena-max N`` starts
the server with ``MALLOC_ARENA_MAX=N`` (glibc's per-thread malloc arenas, the usual source of RSS that grows with
concurrency and then stays). Repeat a client count (``--clients 1,4,16,16``) to see whether the growth levels
off. Questions are the dev set's, one per request, in a seeded
order. Then each malformed request is sent once: its HTTP status and the message the server answered with.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT / "benchmarks" / "dev" / "natural_dev.jsonl"

MALFORMED: dict[str, Any] = {
    "no question column": {"dataframe_records": [{"query": "Who founded Rome?"}]},
    "1 MB question": {"dataframe_records": [{"question": "x" * 1_000_000}]},
    "question is a number": {"dataframe_records": [{"question": 42}]},
    "empty question": {"dataframe_records": [{"question": "   "}]},
    "not JSON": b"{not json",
    "no records key": {"questions": ["Who founded Rome?"]},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its children (uvicorn workers), in MiB."""
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


class RssSampler(threading.Thread):
    """The server's RSS once a second, in the background, for as long as the run lasts."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.t0, self.series, self.done = pid, time.monotonic(), [], threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            self.series.append((round(time.monotonic() - self.t0, 1), round(rss_mb(self.pid), 1)))

    def since(self, start: int) -> list[float]:
        return [mb for _, mb in self.series[start:]]


def local_model(checkpoint: str, passages: int, folder: Path, seed: int = 0) -> str:
    """A QA model folder (what the registry would hold) for ``checkpoint`` over a store build of ``passages``
    seeded bundled passages in the embedded Postgres (compressed once, reused): serving without the services."""
    import mlflow.pyfunc

    from clara.data.corpus import corpus_version_of, ingest_corpus
    from clara.model.checkpoint import load_checkpoint
    from clara.retrieval.dense import DenseEncoder
    from clara.store.db import connect
    from clara.store.loading import index_corpus
    from clara_flows.registry import MODEL_CODE, model_signature

    model = load_checkpoint(checkpoint)
    docs, _ = ingest_corpus("bundled", model.cfg)
    rng = np.random.default_rng(seed)
    sub = [docs[i] for i in sorted(rng.choice(len(docs), min(passages, len(docs)), replace=False))]
    build = index_corpus(connect(None), model, sub, model_uri=str(Path(checkpoint).resolve()),
                         corpus_version=corpus_version_of(sub), dense=DenseEncoder(), reuse=True)
    mlflow.pyfunc.save_model(folder, python_model=str(MODEL_CODE["qa"]), artifacts={"checkpoint": str(checkpoint)},
                             signature=model_signature("qa", "question"),
                             model_config={"build_id": build.id, "mode": "hybrid", "k": 5, "rerank": "always"})
    return str(folder)


def start_server(model: str, port: int, log: Path, arena_max: int | None = None,
                 merge: bool | None = None) -> subprocess.Popen:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    if arena_max:
        env["MALLOC_ARENA_MAX"] = str(arena_max)
    if merge is not None:
        env["CLARA_MERGE"] = "1" if merge else "0"
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local",
                                 "-h", "127.0.0.1", "-p", str(port), "-t", "600"],
                                env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the model server exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGTERM)
    raise RuntimeError(f"the model server did not answer /ping within 300 s; see {log}")


def load(url: str, questions: list[str], clients: int, seconds: float, seed: int) -> dict[str, Any]:
    """``clients`` threads, each sending one question at a time until ``seconds`` have passed."""
    import httpx

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(timeout=600) as http:
            while time.monotonic() < stop:
                q = rng.choice(questions)
                t0 = time.perf_counter()
                try:
                    code = str(http.post(url, json={"dataframe_records": [{"question": q}]}).status_code)
                except httpx.HTTPError as e:
                    code = type(e).__name__
                dt = time.perf_counter() - t0
                with lock:
                    statuses[code] = statuses.get(code, 0) + 1
                    if code == "200":
                        latencies.append(dt)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0  # includes the requests in flight at the deadline
    ms = np.asarray(latencies) * 1000.0
    ok = statuses.get("200", 0)
    return {"clients": clients, "seconds": round(wall, 1), "requests": sum(statuses.values()), "ok": ok,
            "errors": sum(statuses.values()) - ok, "statuses": statuses, "requests_per_s": ok / wall,
            "ms_p50": float(np.percentile(ms, 50)) if ok else None,
            "ms_p95": float(np.percentile(ms, 95)) if ok else None,
            "ms_p99": float(np.percentile(ms, 99)) if ok else None}


def malformed(url: str) -> dict[str, Any]:
    import httpx

    out = {}
    for case, body in MALFORMED.items():
        if isinstance(body, bytes):
            r = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=120)
        else:
            r = httpx.post(url, json=body, timeout=120)
        try:
            message = str(r.json().get("message", r.text))
        except ValueError:
            message = r.text
        # MLflow puts the input's repr before the model's own message ("Failed to predict data '…'. Error: …")
        message = message.rsplit("Error: ", 1)[-1].strip()
        out[case] = {"status": r.status_code, "message": message.splitlines()[0][:300] if message else ""}
    return out


def serve_and_load(model: str, questions: list[str], clients: list[int], seconds: float, seed: int,
                   arena_max: int | None, merge: bool | None) -> dict[str, Any]:
    """One server of ``model``: warm-up, each client count in turn, the malformed requests; RSS sampled."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}/invocations"
    # the server's log is for diagnosing this run, not a result: it stays out of benchmarks/results
    log = Path(tempfile.mkdtemp(prefix="clara-load-")) / "server.log"
    print(f"server log: {log}", flush=True)
    proc = start_server(model, port, log, arena_max, merge)
    try:
        warm = httpx.post(url, json={"dataframe_records": [{"question": questions[0]}]}, timeout=600)
        if warm.status_code != 200:
            raise RuntimeError(f"warm-up request failed with {warm.status_code}: {warm.text[:500]}")
        result: dict[str, Any] = {"model": model, "merge": merge, "host": "127.0.0.1", "threads": os.cpu_count(),
                                  "malloc_arena_max": arena_max, "seconds_per_level": seconds,
                                  "rss_mb_start": rss_mb(proc.pid), "levels": []}
        sampler = RssSampler(proc.pid)
        sampler.start()
        for n in clients:
            start = len(sampler.series)
            level = load(url, questions, n, seconds, seed)
            seen = sampler.since(start) or [rss_mb(proc.pid)]
            level.update(rss_mb_peak=max(seen), rss_mb_end=seen[-1])
            result["levels"].append(level)
            print(json.dumps(level), flush=True)
        base = result["levels"][0]["requests_per_s"]
        for level in result["levels"]:
            level["throughput_vs_first"] = level["requests_per_s"] / base if base else None
        result["rss_mb_after_load"] = rss_mb(proc.pid)
        result["malformed"] = malformed(url)
        result["server_alive_after"] = proc.poll() is None
        result["rss_mb_end"] = rss_mb(proc.pid)  # after the malformed requests (one is a 1 MB body)
        sampler.done.set()
        result["rss_series"] = sampler.series
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    return result


def table(result: dict[str, Any]) -> None:
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    print(f"\nmerge={result['merge']}\n| clients | req/s | p50 ms | p95 ms | p99 ms | errors | throughput vs 1 | "
          "RSS peak / end MiB |\n|---|---|---|---|---|---|---|---|")
    for lv in result["levels"]:
        print(f"| {lv['clients']} | {lv['requests_per_s']:.2f} | {f(lv['ms_p50'], '.0f')} | {f(lv['ms_p95'], '.0f')} | "
              f"{f(lv['ms_p99'], '.0f')} | {lv['errors']} | {f(lv['throughput_vs_first'], '.2f')} | "
              f"{lv['rss_mb_peak']:.0f} / {lv['rss_mb_end']:.0f} |")
    print(f"server RSS {result['rss_mb_start']:.0f} MiB after warm-up -> {result['rss_mb_after_load']:.0f} after the "
          f"load -> {result['rss_mb_end']:.0f} after the malformed requests")
    for case, r in result["malformed"].items():
        print(f"{case}: {r['status']} {r['message'][:120]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models:/clara@production")
    ap.add_argument("--checkpoint", default=None,
                    help="Instead of --model: serve this checkpoint over a build of --passages bundled passages in "
                         "the embedded Postgres (no services needed).")
    ap.add_argument("--passages", type=int, default=300, help="--checkpoint: passages in its build.")
    ap.add_argument("--compare-merge", action="store_true",
                    help="Serve twice in this run, unmerged adapters (CLARA_MERGE=0) then merged copies "
                         "(CLARA_MERGE=1), and report the throughput ratio per client count.")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arena-max", type=int, default=None, help="MALLOC_ARENA_MAX for the server (default: unset)")
    ap.add_argument("--out", default="benchmarks/results/load.json")
    args = ap.parse_args()
    if args.checkpoint:
        model = local_model(args.checkpoint, args.passages, Path(tempfile.mkdtemp(prefix="clara-load-model-")) / "m")
    elif not os.environ.get("MLFLOW_TRACKING_URI"):
        sys.exit('MLFLOW_TRACKING_URI is not set: run  eval "$(python -m clara_infra.services env)"  first')
    else:
        model = args.model

    questions = [json.loads(line)["question"] for line in DEV.read_text(encoding="utf-8").splitlines() if line]
    clients = [int(x) for x in args.clients.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = [serve_and_load(model, questions, clients, args.seconds, args.seed, args.arena_max, merge)
            for merge in ((False, True) if args.compare_merge else (None,))]
    result = runs[0] if len(runs) == 1 else {
        "model": args.checkpoint or model, "passages": args.passages if args.checkpoint else None,
        "unmerged": runs[0], "merged": runs[1],
        "throughput_merged_vs_unmerged": {lv0["clients"]: lv1["requests_per_s"] / lv0["requests_per_s"]
                                          for lv0, lv1 in zip(runs[0]["levels"], runs[1]["levels"])}}
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    for r in runs:
        table(r)
    if len(runs) == 2:
        print("throughput merged / unmerged per client count:",
              {k: round(v, 2) for k, v in result["throughput_merged_vs_unmerged"].items()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
