"""Bounded soak of a real server on loopback: does it stay up, bounded and correct under a mix
of valid work, bad input, disconnects, oversized uploads, and a SIGTERM drain at the end?

    .venv/bin/python loadtests/soak.py --seconds 300 --concurrency 32 --out artifacts/soak

Starts `stts-serve` on the demo checkpoint (built in a temp dir unless `--checkpoint`), runs
`--concurrency` clients for `--seconds`, each picking scenarios at random (seeded), then sends
SIGTERM while requests are in flight and keeps the clients going until the server is gone.
Checks: no 5xx at all; every valid request admitted before the drain answered 200; after
the drain, every upload a client kept has its record on disk and its stored bytes hash to what
was sent; the process exits within its drain time. Prints and writes `soak.json`, `soak.png`
(RSS of the server process tree over time, outcomes per 5 s) and `server.log`; exit status 1
if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from chat_load import wait_until_ready  # this folder: run as a script

API_KEY = "soak"
MAX_VIDEO_BYTES = 4 * 1024 * 1024
DRAIN_SECONDS = 30


def _video(seed: int, frames: int = 8, size: int = 112) -> bytes:
    import av

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=4)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        for i in range(frames):
            frame = np.roll(base, 6 * i, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def _png(width: int, height: int) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 10)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _data_url(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def _video_chat(url: Any, **extra: Any) -> dict[str, Any]:
    part = {"type": "video_url", "video_url": {"url": url}}
    content = [part, {"type": "text", "text": "What moves?"}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 6} | extra


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)  # (scenario, status) -> count
    timeline: list[tuple[float, str, int | str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    uploads: dict[str, tuple[str, int]] = field(default_factory=dict)  # id -> (sha256, bytes)

    def record(self, scenario: str, status: int | str, start: float) -> None:
        self.outcomes[(scenario, status)] += 1
        self.timeline.append((time.monotonic() - start, scenario, status))


# scenario -> statuses it may get before the drain (after it: 503 or no connection as well)
EXPECTED: dict[str, set[int | str]] = {
    "video": {200},
    "stream": {200},
    "file_question": {200},
    "upload_delete": {200},
    "corrupt_video": {400},
    "unknown_file": {404},
    "bad_seed": {400},
    "degenerate_frames": {400},
    "too_many_videos": {400},
    "too_many_frames": {400},
    "bad_key": {401},
    "non_ascii_key": {401},
    "malformed_json": {400},
    "oversized_upload": {413},
    "disconnect": {"disconnected", 200},
}
VALID = {"video", "stream", "file_question", "upload_delete"}
WEIGHTS = {name: 1 for name in EXPECTED} | {"video": 4, "stream": 3, "file_question": 3}


class Soak:
    def __init__(self, url: str, files_dir: Path, seed: int) -> None:
        self.url = url
        self.files_dir = files_dir
        self.rng = random.Random(seed)
        self.tally = Tally()
        self.draining = False
        self.clips = [_video(s) for s in range(6)]
        self.file_id = ""
        self.uploads = 0
        self.start = time.monotonic()

    def client(self, key: str | bytes | None = API_KEY, timeout: float = 120) -> httpx.AsyncClient:
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)

    async def upload(self, client: httpx.AsyncClient, data: bytes, name: str) -> httpx.Response:
        files = {"file": (name, data, "video/mp4")}
        response = await client.post("/v1/files", files=files, data={"purpose": "vision"})
        if response.status_code == 200:
            file_id = response.json()["id"]
            self.tally.uploads[file_id] = (hashlib.sha256(data).hexdigest(), len(data))
        return response

    async def scenario(self, name: str, client: httpx.AsyncClient) -> int | str:
        chat = "/v1/chat/completions"
        clip = self.rng.choice(self.clips)
        if name == "video":
            return (await client.post(chat, json=_video_chat(_data_url(clip)))).status_code
        if name == "file_question":
            return (await client.post(chat, json=_video_chat(self.file_id))).status_code
        if name == "stream":
            body = _video_chat(_data_url(clip), stream=True)
            async with client.stream("POST", chat, json=body) as response:
                lines = [line async for line in response.aiter_lines() if line]
                if response.status_code == 200 and lines[-1] != "data: [DONE]":
                    self.tally.failures.append(f"stream ended without [DONE]: {lines[-1]!r}")
                return response.status_code
        if name == "upload_delete":
            self.uploads += 1  # a fresh clip each time: the same bytes would share an id
            data = _video(10**6 + self.uploads, frames=4)
            response = await self.upload(client, data, "clip.mp4")
            if response.status_code != 200:
                return response.status_code
            file_id = response.json()["id"]
            got = await client.get(f"/v1/files/{file_id}")
            if got.status_code == 200 and got.json()["bytes"] != len(data):
                self.tally.failures.append(f"{file_id}: size {got.json()['bytes']} != {len(data)}")
            if self.rng.random() < 0.5:  # keep half: the end checks they survived intact
                deleted = await client.delete(f"/v1/files/{file_id}")
                if deleted.status_code == 200:
                    self.tally.uploads.pop(file_id, None)
            return got.status_code
        if name == "corrupt_video":
            junk = clip[: len(clip) // 3] if self.rng.random() < 0.5 else os.urandom(2048)
            return (await client.post(chat, json=_video_chat(_data_url(junk)))).status_code
        if name == "unknown_file":
            body = _video_chat(f"file-{self.rng.getrandbits(128):032x}")
            return (await client.post(chat, json=body)).status_code
        if name == "bad_seed":
            body = _video_chat(_data_url(clip), seed=2**64 + 1)
            return (await client.post(chat, json=body)).status_code
        if name == "degenerate_frames":
            body = _video_chat([_png(1, 250), _png(1, 250)])
            return (await client.post(chat, json=body)).status_code
        if name == "too_many_videos":
            message = _video_chat(_data_url(clip))["messages"][0]
            body = {"messages": [message] * 6, "max_tokens": 4}
            return (await client.post(chat, json=body)).status_code
        if name == "too_many_frames":
            body = _video_chat(_data_url(clip), stts={"num_frames": 4096})
            return (await client.post(chat, json=body)).status_code
        if name in ("bad_key", "non_ascii_key"):
            key = "wrong" if name == "bad_key" else "schlüssel-ключ"
            headers = {"Authorization": f"Bearer {key}".encode()}
            body = _video_chat(_data_url(clip))
            return (await client.post(chat, json=body, headers=headers)).status_code
        if name == "malformed_json":
            headers = {"Content-Type": "application/json"}
            return (await client.post(chat, content=b'{"messages": [', headers=headers)).status_code
        if name == "oversized_upload":
            boundary = "soak-boundary"
            head = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nx\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                'filename="big.mp4"\r\nContent-Type: video/mp4\r\n\r\n'
            ).encode()

            async def body():  # chunked: no Content-Length to refuse up front
                yield head
                for _ in range(MAX_VIDEO_BYTES // (256 * 1024) + 8):
                    yield os.urandom(256 * 1024)

            headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
            try:
                response = await client.post("/v1/files", content=body(), headers=headers)
            except httpx.RemoteProtocolError:  # the server answered and closed mid-upload
                return 413
            return response.status_code
        if name == "disconnect":
            body = _video_chat(_data_url(clip), max_tokens=64)
            try:
                async with self.client(timeout=0.3) as impatient:
                    return (await impatient.post(chat, json=body)).status_code
            except httpx.TimeoutException:
                return "disconnected"
        raise ValueError(name)

    async def worker(self, stop_at: float, gone: asyncio.Event) -> None:
        names, weights = list(WEIGHTS), list(WEIGHTS.values())
        async with self.client() as client:
            while not gone.is_set() and time.monotonic() < stop_at:
                name = self.rng.choices(names, weights)[0]
                draining = self.draining
                try:
                    status: int | str = await self.scenario(name, client)
                except httpx.TransportError as exc:
                    status = "refused" if (draining or self.draining) else type(exc).__name__
                expected = EXPECTED[name] | ({503, "refused"} if self.draining else set())
                if status not in expected:
                    self.tally.failures.append(f"{name}: got {status}")
                self.tally.record(name, status, self.start)
                if status == "refused" and self.draining:
                    return


def _rss(process: psutil.Process) -> int:
    try:
        tree = [process, *process.children(recursive=True)]
        return sum(p.memory_info().rss for p in tree if p.is_running())
    except psutil.Error:
        return 0


async def _sample_rss(pid: int, series: list[tuple[float, int]], start: float) -> None:
    process = psutil.Process(pid)
    while True:
        series.append((time.monotonic() - start, _rss(process)))
        await asyncio.sleep(2)


def _check_uploads(soak: Soak) -> list[str]:
    """After the drain (no request in flight, every client's view settled): every upload a
    client kept has its record on disk with its size and digest, and its stored bytes hash to
    what was sent."""
    problems = []
    for file_id, (digest, size) in soak.tally.uploads.items():
        records = list(soak.files_dir.rglob(f"{file_id}.json"))
        blobs = list(soak.files_dir.rglob(f"{file_id}.bin"))
        if len(records) != 1 or len(blobs) != 1:
            problems.append(f"upload {file_id} lost ({len(records)} records, {len(blobs)} blobs)")
            continue
        record = json.loads(records[0].read_text())
        if record.get("bytes") != size or record.get("sha256") != digest:
            problems.append(f"upload {file_id}: record says {record.get('bytes')} bytes")
        elif hashlib.sha256(blobs[0].read_bytes()).hexdigest() != digest:
            problems.append(f"upload {file_id} corrupt on disk")
    return problems


def launch(checkpoint: Path, port: int, work: Path, log_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env |= {
        "STTS_API_KEY": API_KEY,
        "STTS_FILES_DIR": str(work / "files"),
        "STTS_MAX_VIDEO_BYTES": str(MAX_VIDEO_BYTES),
        "STTS_MAX_FILES": "1000",
        "STTS_DRAIN_SECONDS": str(DRAIN_SECONDS),
        "STTS_MAX_FRAMES": "64",
    }
    argv = [sys.executable, "-m", "server.cli", "--model", str(checkpoint), "--port", str(port)]
    argv += ["--max-model-len", "8192"]
    log = log_path.open("w")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    wait_until_ready(process, port, log_path)
    return process


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    checkpoint = args.checkpoint
    if checkpoint is None:
        from stts_vllm.demo import make_demo

        checkpoint = make_demo(work / "model")
    process = launch(checkpoint, port, work, args.out / "server.log")
    soak = Soak(f"http://127.0.0.1:{port}", work / "files", args.seed)
    async with soak.client() as client:
        response = await soak.upload(client, soak.clips[0], "shared.mp4")
        soak.file_id = response.json()["id"]
    rss: list[tuple[float, int]] = []
    soak.start = time.monotonic()
    sampler = asyncio.create_task(_sample_rss(process.pid, rss, soak.start))
    gone = asyncio.Event()
    stop_at = soak.start + args.seconds + DRAIN_SECONDS + 60
    workers = [asyncio.create_task(soak.worker(stop_at, gone)) for _ in range(args.concurrency)]
    report_every = max(10.0, args.seconds / 10)
    while time.monotonic() - soak.start < args.seconds:
        await asyncio.sleep(min(report_every, args.seconds - (time.monotonic() - soak.start)))
        done = sum(soak.tally.outcomes.values())
        print(
            f"[soak] {time.monotonic() - soak.start:5.0f} s: {done} requests, "
            f"RSS {max(r for _, r in rss) / 2**30:.2f} GiB peak",
            flush=True,
        )
    drain_start = time.monotonic()
    soak.draining = True
    process.send_signal(signal.SIGTERM)
    exit_code = await asyncio.to_thread(process.wait, DRAIN_SECONDS + 60)
    drain_seconds = time.monotonic() - drain_start
    gone.set()
    await asyncio.gather(*workers)
    sampler.cancel()
    upload_problems = _check_uploads(soak)
    outcomes = soak.tally.outcomes
    server_errors = sum(
        n for (_, s), n in outcomes.items() if isinstance(s, int) and s >= 500 and s != 503
    )
    refused_after_drain = sum(n for (_, s), n in outcomes.items() if s in (503, "refused"))
    valid = {k: n for k, n in outcomes.items() if k[0] in VALID}
    return {
        "seconds": args.seconds,
        "concurrency": args.concurrency,
        "requests": sum(outcomes.values()),
        "outcomes": {
            f"{name}:{status}": n
            for (name, status), n in sorted(
                outcomes.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))
            )
        },
        "server_errors_5xx": server_errors,
        "valid_answered": sum(n for (_, s), n in valid.items() if s == 200),
        "valid_refused_while_draining": sum(n for (_, s), n in valid.items() if s != 200),
        "refused_while_draining": refused_after_drain,
        "uploads_kept": len(soak.tally.uploads),
        "upload_problems": upload_problems,
        "failures": soak.tally.failures[:50],
        "failure_count": len(soak.tally.failures),
        "peak_rss_gib": max(r for _, r in rss) / 2**30,
        "rss_series": [(round(t, 1), r) for t, r in rss],
        "drain_exit_code": exit_code,
        "drain_seconds": drain_seconds,
        "timeline": soak.tally.timeline,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    times, rss = zip(*report["rss_series"], strict=True)
    top.plot(times, [r / 2**30 for r in rss])
    top.set_ylabel("server RSS (GiB)")
    top.set_title(
        f"soak: {report['concurrency']} clients, {report['requests']} requests, "
        f"{report['server_errors_5xx']} x 5xx"
    )
    end = max(t for t, _, _ in report["timeline"]) + 1
    bins = np.arange(0, end + 5, 5)
    kinds = {
        "2xx": lambda s: s == 200,
        "4xx": lambda s: isinstance(s, int) and 400 <= s < 500,
        "503/refused (drain)": lambda s: s in (503, "refused"),
        "disconnected": lambda s: s == "disconnected",
    }
    for label, test in kinds.items():
        hits = [t for t, _, s in report["timeline"] if test(s)]
        bottom.hist(hits, bins=bins, histtype="step", label=label)
    bottom.axvline(report["seconds"], color="grey", linestyle="--", label="SIGTERM")
    bottom.set_ylabel("requests / 5 s")
    bottom.set_xlabel("seconds")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("artifacts/soak"))
    parser.add_argument("--smoke", action="store_true", help="15 s, 4 clients (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.seconds, args.concurrency = 15.0, 4
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stts-soak-") as tmp:
        report = asyncio.run(run(args, Path(tmp)))
    timeline = report.pop("timeline")
    (args.out / "soak.json").write_text(json.dumps(report, indent=1))
    plot(report | {"timeline": timeline}, args.out / "soak.png")
    summary = {k: v for k, v in report.items() if k not in ("rss_series", "outcomes")}
    print(json.dumps(summary, indent=1))
    ok = (
        report["server_errors_5xx"] == 0
        and not report["upload_problems"]
        and report["failure_count"] == 0
        and report["drain_exit_code"] in (0, -signal.SIGTERM)
    )
    print(f"soak {'passed' if ok else 'FAILED'}; report in {args.out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
