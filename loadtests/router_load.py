"""Replicas behind vLLM's router: does a video's conversation stay where its caches are?

    .venv/bin/python loadtests/router_load.py --replicas 2 --turns 3 --out artifacts/router-load

Starts N `stts-serve` replicas of one checkpoint (default: a fresh demo) on one files directory
and, for each `--policies` entry, `vllm-router` in front of them (the replicas stay up between
policies). Every conversation gets a clip of its own, uploaded to the replicas in turn (as a
Kubernetes Service or the compose gateway spreads uploads: the router does not take multipart
bodies), then asks `--turns` questions about it through the router, history resent, with an
`X-Session-Id` header per conversation (what deploy/README.md section 5 tells clients to send).

Reported per configuration, side by side: TTFT p50 of first and of later turns, req/s, errors,
and the share of later turns that reached a replica already holding their video, from each
replica's own `stts_video_decodes_total{cache="hit"}` (every clip is new, so a hit is a later
turn on a replica that decoded the clip before). `single` is the same workload on one replica
without the router: the target is later-turn TTFT through the router within 1.2x of it.

`--fault` adds a run where one replica is killed (SIGKILL) mid-load and started again on its
port: errors by kind, time until the router sends to it again, errors after that, and whether
every upload is still listed. Writes `router_load.json` and `router_load.png`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from chat_load import (
    API_KEY,
    CrashableServer,
    LevelResult,
    Sample,
    clip,
    conversation,
    free_port,
    launch,
    stop,
    upload,
)

ROOT = Path(__file__).resolve().parents[1]
SESSION_HEADER = "X-Session-Id"
GOAL_LATER_TTFT_RATIO = 1.2


# --------------------------------------------------------------------------- processes


@dataclass
class Replica(CrashableServer):
    """One stts-serve process; `start` again brings it back on the same port."""

    checkpoint: Path
    port: int
    log: Path
    files_dir: Path
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = launch(self.checkpoint, self.port, self.log, {}, self.files_dir, self.env)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            stop(self.process)
        self.reap()


def router_binary() -> str:
    found = os.environ.get("VLLM_ROUTER") or shutil.which("vllm-router")
    local = ROOT / ".venv-router/bin/vllm-router"
    if found:
        return found
    if local.exists():
        return str(local)
    raise SystemExit("vllm-router not found: run scripts/install_router.sh")


def start_router(workers: list[str], policy: str, port: int, log: Path) -> subprocess.Popen:
    """`vllm-router` on 127.0.0.1:`port` with `policy` and the deployments' health checks
    (deploy/compose.yaml); returns once it answers chat routes (all workers ready)."""
    argv = [router_binary(), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--worker-urls", *workers, "--policy", policy]
    argv += ["--health-check-endpoint", "/ready", "--health-check-interval-secs", "5"]
    argv += ["--health-failure-threshold", "2", "--cb-timeout-duration-secs", "15"]
    argv += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    argv += ["--log-level", "warning"]
    process = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    headers = {"Authorization": f"Bearer {API_KEY}"}
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"router exited with {process.returncode}; see {log}")
        try:
            url = f"http://127.0.0.1:{port}/v1/models"
            if httpx.get(url, headers=headers, timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"router not ready in 120 s; see {log}")


# --------------------------------------------------------------------------- metrics


async def replica_counts(urls: list[str]) -> list[dict[str, float]]:
    """Per replica: decoded-frame cache hits and misses, chat requests answered."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = []
    async with httpx.AsyncClient(timeout=30) as client:
        for url in urls:
            text = (await client.get(f"{url}/metrics")).text
            row = {"hit": 0.0, "miss": 0.0, "chat": 0.0}
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    if s.name == "stts_video_decodes_total" and s.labels["cache"] in row:
                        row[s.labels["cache"]] += s.value
                    if s.name == "stts_requests_total" and "chat" in s.labels.get("route", ""):
                        row["chat"] += s.value
            counts.append(row)
    return counts


def deltas(before: list[dict[str, float]], after: list[dict[str, float]]) -> list[dict]:
    return [{k: a[k] - b[k] for k in a} for b, a in zip(before, after, strict=True)]


# --------------------------------------------------------------------------- workloads


async def upload_clips(
    replicas: list[Replica], count: int, seed: int, seconds: list[float]
) -> list[str]:
    """`count` distinct clips, uploaded to the replicas in turn."""
    ids = []
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for i in range(count):
        replica = replicas[i % len(replicas)]
        async with httpx.AsyncClient(base_url=replica.url, headers=headers, timeout=120) as c:
            data = clip(seconds[i % len(seconds)], seed + i)
            ids.append(await upload(c, data, f"clip-{seed + i}.mp4"))
    return ids


async def conversations(
    url: str, file_ids: list[str], args: argparse.Namespace, tag: str
) -> tuple[list[Sample], float]:
    """Every file's conversation through `url`, `args.concurrency` at a time, each with its
    own session header; returns the samples and the wall time."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    limits = httpx.Limits(max_connections=args.concurrency + 2)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as c:
        model = (await c.get("/v1/models")).json()["data"][0]["id"]
        queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        for item in enumerate(file_ids):
            queue.put_nowait(item)
        samples: list[Sample] = []

        async def worker() -> None:
            while not queue.empty():
                i, file_id = queue.get_nowait()
                session = {SESSION_HEADER: f"{tag}-conversation-{i}"}
                samples.extend(
                    await conversation(
                        c, model, file_id, args.keep, args.turns, args.max_tokens, session
                    )
                )

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        return samples, time.perf_counter() - start


async def delete_files(url: str, file_ids: list[str]) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
        for file_id in file_ids:
            (await client.delete(f"/v1/files/{file_id}")).raise_for_status()


async def measure(
    name: str, url: str, replicas: list[Replica], seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One configuration: fresh clips, their conversations through `url`, per-replica metric
    deltas; the clips are deleted after (through a replica: file routes bypass the router)."""
    file_ids = await upload_clips(replicas, args.conversations, seed, args.video_seconds)
    urls = [r.url for r in replicas]
    before = await replica_counts(urls)
    samples, wall = await conversations(url, file_ids, args, name)
    per_replica = deltas(before, await replica_counts(urls))
    await delete_files(replicas[-1].url, file_ids)
    result = LevelResult(name, args.concurrency, wall, samples).summary()
    later = sum(1 for s in samples if s.ok and s.turn > 0)
    hits = sum(r["hit"] for r in per_replica)
    return {
        "config": name,
        "requests": result["requests"],
        "errors": result["errors"],
        "error_examples": result["error_examples"],
        "wall_seconds": wall,
        "requests_per_second": result["requests_per_second"],
        "ttft_first_turn_p50": result["ttft_first_turn_seconds"]["p50"],
        "ttft_later_turns_p50": result["ttft_later_turns_seconds"]["p50"],
        "later_turns": later,
        "later_turns_on_holding_replica": hits,
        "share_on_holding_replica": hits / later if later else None,
        "chat_requests_per_replica": [r["chat"] for r in per_replica],
    }


# --------------------------------------------------------------------------- fault


async def fault_run(
    replicas: list[Replica], router_url: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Load through the router while the last replica is killed and restarted: every request
    is recorded with its start time, so errors can be told apart before and after the killed
    replica rejoined (its /ready answers and the router sends it chat again)."""
    victim = replicas[-1]
    file_ids = await upload_clips(replicas, args.conversations, 90_000, args.video_seconds)
    log: list[tuple[float, Sample]] = []
    headers = {"Authorization": f"Bearer {API_KEY}"}
    limits = httpx.Limits(max_connections=args.concurrency + 2)
    t0 = time.perf_counter()
    stop_at = t0 + args.fault_seconds
    events: dict[str, float] = {}

    async with httpx.AsyncClient(
        base_url=router_url, headers=headers, timeout=600, limits=limits
    ) as c:
        model = (await c.get("/v1/models")).json()["data"][0]["id"]

        async def worker(w: int) -> None:
            i = w
            while time.perf_counter() < stop_at:
                started = time.perf_counter() - t0
                file_id = file_ids[i % len(file_ids)]
                session = {SESSION_HEADER: f"fault-{w}-{i}"}
                samples = await conversation(
                    c, model, file_id, args.keep, args.turns, args.max_tokens, session
                )
                log.extend((started, s) for s in samples)
                i += args.concurrency

        async def chaos() -> None:
            await asyncio.sleep(args.kill_after)
            events["killed"] = time.perf_counter() - t0
            victim.kill()
            await asyncio.sleep(1)
            await asyncio.to_thread(victim.start)  # returns when /ready answers
            events["replica_ready"] = time.perf_counter() - t0
            before = (await replica_counts([victim.url]))[0]["chat"]
            while time.perf_counter() < stop_at:
                await asyncio.sleep(0.5)
                if (await replica_counts([victim.url]))[0]["chat"] > before:
                    events["routed_again"] = time.perf_counter() - t0
                    return

        await asyncio.gather(chaos(), *(worker(w) for w in range(args.concurrency)))
    async with httpx.AsyncClient(base_url=victim.url, headers=headers, timeout=60) as c:
        listed = {f["id"] for f in (await c.get("/v1/files")).json()["data"]}
    await delete_files(victim.url, file_ids)
    rejoined = events.get("routed_again", events.get("replica_ready", float("inf")))
    errors = [(t, s) for t, s in log if not s.ok]
    return {
        "requests": len(log),
        "errors": len(errors),
        "errors_by_status": _count(str(s.status) for _, s in errors),
        "error_examples": sorted({str(s.error)[:160] for _, s in errors})[:5],
        "errors_started_after_rejoin": sum(1 for t, _ in errors if t > rejoined),
        "http_5xx_after_rejoin": sum(1 for t, s in log if t > rejoined and s.status >= 500),
        "killed_at_seconds": events.get("killed"),
        "replica_ready_seconds_after_kill": _since(events, "replica_ready"),
        "routed_again_seconds_after_kill": _since(events, "routed_again"),
        "uploads": len(file_ids),
        "uploads_lost": len(set(file_ids) - listed),
    }


def _since(events: dict[str, float], name: str) -> float | None:
    return events[name] - events["killed"] if name in events and "killed" in events else None


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


# --------------------------------------------------------------------------- report


def targets(rows: list[dict]) -> list[dict]:
    single = next((r for r in rows if r["config"] == "single"), None)
    out = []
    if not single or not single["ttft_later_turns_p50"]:
        return out
    for row in rows:
        if row["config"] == "single" or not row["ttft_later_turns_p50"]:
            continue
        ratio = row["ttft_later_turns_p50"] / single["ttft_later_turns_p50"]
        out.append(
            {
                "target": f"later-turn TTFT p50, {row['config']} vs single server",
                "goal": GOAL_LATER_TTFT_RATIO,
                "measured": ratio,
                "met": ratio <= GOAL_LATER_TTFT_RATIO,
            }
        )
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["config"] for r in rows]
    x = range(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    first = [r["ttft_first_turn_p50"] or 0 for r in rows]
    later = [r["ttft_later_turns_p50"] or 0 for r in rows]
    axes[0].bar([i - 0.2 for i in x], first, 0.4, label="first turn", color="#888888")
    axes[0].bar([i + 0.2 for i in x], later, 0.4, label="later turns", color="#2e7d32")
    axes[0].set_title("TTFT p50 (s)")
    axes[0].legend(fontsize=8)
    axes[1].bar(x, [r["requests_per_second"] for r in rows], color="#1f77b4")
    axes[1].set_title("requests / s")
    shares = [r["share_on_holding_replica"] or 0 for r in rows]
    axes[2].bar(x, shares, color="#e6a03c")
    axes[2].set_ylim(0, 1.05)
    axes[2].set_title("later turns on the replica holding the video")
    for ax in axes:
        ax.set_xticks(list(x), names, rotation=15, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save(report: dict, out: Path) -> None:
    (out / "router_load.json").write_text(json.dumps(report, indent=2))
    if report["rows"]:
        plot(report["rows"], out / "router_load.png")


# --------------------------------------------------------------------------- main


async def run(replicas: list[Replica], args: argparse.Namespace, report: dict) -> None:
    rows = report["rows"]
    rows.append(await measure("single", replicas[0].url, replicas, 1000, args))
    save(report, args.out)
    for k, policy in enumerate(args.policies):
        port = free_port()
        router = start_router(
            [r.url for r in replicas], policy, port, args.out / f"router-{policy}.log"
        )
        try:
            url = f"http://127.0.0.1:{port}"
            rows.append(await measure(policy, url, replicas, 2000 + 1000 * k, args))
        finally:
            stop(router)
        report["targets"] = targets(rows)
        save(report, args.out)
        print(f"{policy}: {json.dumps(rows[-1])}", file=sys.stderr)
    if args.fault:
        port = free_port()
        router = start_router(
            [r.url for r in replicas], args.fault_policy, port, args.out / "router-fault.log"
        )
        try:
            report["fault"] = await fault_run(replicas, f"http://127.0.0.1:{port}", args)
        finally:
            stop(router)
        save(report, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: a fresh demo")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument(
        "--policies", nargs="+", default=["round_robin", "cache_aware", "consistent_hash"]
    )
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--video-seconds", type=float, nargs="+", default=[10.0])
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--fault", action="store_true", help="also kill a replica under load")
    parser.add_argument("--fault-policy", default="consistent_hash")
    parser.add_argument("--fault-seconds", type=float, default=120.0, help="load in the fault run")
    parser.add_argument("--kill-after", type=float, default=15.0, help="seconds into the fault run")
    parser.add_argument("--out", type=Path, default=Path("artifacts/router-load"))
    parser.add_argument("--smoke", action="store_true", help="2 conversations, 2 turns, 1 policy")
    args = parser.parse_args()
    if args.smoke:
        args.conversations, args.turns, args.concurrency = 2, 2, 2
        args.video_seconds, args.max_tokens = [2.0], 4
        args.policies = args.policies if "--policies" in sys.argv else ["consistent_hash"]
        args.fault_seconds, args.kill_after = 60.0, 5.0
    args.out.mkdir(parents=True, exist_ok=True)
    router_binary()

    from stts_vllm.demo import make_demo

    tmp = Path(tempfile.mkdtemp(prefix="stts-router-load-"))
    checkpoint = args.checkpoint or make_demo(tmp / "demo")
    share = os.environ.get("STTS_GPU_MEMORY_UTILIZATION") or f"{0.8 / args.replicas:.2f}"
    env = {"STTS_GPU_MEMORY_UTILIZATION": share}
    replicas = [
        Replica(checkpoint, free_port(), args.out / f"replica-{i}.log", tmp / "files", env)
        for i in range(args.replicas)
    ]
    report: dict[str, Any] = {
        "machine": {"cores": os.cpu_count()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": [],
        "targets": [],
    }
    try:
        for replica in replicas:
            replica.start()
        asyncio.run(run(replicas, args, report))
    finally:
        for replica in replicas:
            replica.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    save(report, args.out)
    for t in report["targets"]:
        status = "met" if t["met"] else "MISSED"
        print(f"target {t['target']}: goal {t['goal']}, measured {t['measured']:.3f} -> {status}")
    if "fault" in report:
        print(f"fault: {json.dumps(report['fault'])}")
    print(f"wrote {args.out / 'router_load.json'} and router_load.png")


if __name__ == "__main__":
    main()
