"""Two real replicas on one files directory behind the real vllm-router (consistent_hash, the
deployments' default) and the real nginx gateway of deploy/gateway/nginx.conf, as `make
serve-replicas` runs them: uploads through the gateway reach every replica, a conversation
with a session key stays on the replica holding its video, and a replica killed under load
costs a bounded number of requests and no upload."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from chat_load import CrashableServer
from media import encode_video, moving_square_video
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import free_port, server_env, server_process
from tests.server.helpers import API_KEY, Server, metric_values

ROOT = Path(__file__).resolve().parents[2]
ROUTER = ROOT / ".venv-router/bin/vllm-router"
GATEWAY_CONF = ROOT / "deploy/gateway/nginx.conf"
LAZY_ROUTER_COUNTERS = {"vllm_router_retries_total"}
pytestmark = pytest.mark.timeout(900)


@dataclass
class Replica(CrashableServer):
    port: int
    log: Path
    argv: list[str]
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, stack: ExitStack) -> None:
        self.process = stack.enter_context(
            server_process(self.argv, self.url, "/ready", self.log, self.env, own_group=True)
        )

    def counts(self) -> dict[str, float]:
        """Chat requests answered, uploads taken, decoded-frame cache hits."""
        values = metric_values(Server(self.url, Path(), self.log, Path()))

        def total(prefix: str) -> float:
            return sum(v for k, v in values.items() if k.startswith(prefix))

        return {
            "chat": total('stts_requests_total{route="/v1/chat/completions"'),
            "upload": total('stts_requests_total{route="/v1/files",status="200"'),
            "hit": total('stts_video_decodes_total{cache="hit"'),
        }


@dataclass
class Deployment:
    url: str  # the gateway: the one address clients use
    replicas: list[Replica]
    stack: ExitStack
    router_metrics: str

    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)


def _router(workers: list[str], port: int, metrics_port: int) -> list[str]:
    argv = [str(ROUTER), "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *workers]
    argv += ["--policy", "consistent_hash", "--health-check-endpoint", "/ready"]
    # the deployments' checks (5 s, 2 failures, circuit breaker 15 s), faster
    argv += ["--health-check-interval-secs", "1", "--health-failure-threshold", "1"]
    argv += ["--cb-timeout-duration-secs", "5"]
    argv += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    return argv


# As root, nginx's workers would run as nobody, who cannot enter pytest's private temp dirs.
_NGINX_GLOBALS = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")


def _gateway_conf(replicas: list[Replica], router_port: int, port: int, tmp: Path) -> Path:
    """deploy/gateway/nginx.conf with this machine's upstreams, port and temp paths."""
    text = GATEWAY_CONF.read_text()
    servers = " ".join(f"server 127.0.0.1:{r.port};" for r in replicas)
    for old, new in {
        "server stts:8000;": servers,
        "server router:8000;": f"server 127.0.0.1:{router_port};",
        "listen 8000;": f"listen 127.0.0.1:{port};",
        "/tmp/": f"{tmp}/",
    }.items():
        assert old in text, old
        text = text.replace(old, new)
    conf = tmp / "nginx.conf"
    conf.write_text(text)
    return conf


@pytest.fixture(scope="module")
def deployment(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    assert nginx, "nginx missing (Debian package nginx-light; scripts/install_test_tools.sh)"
    assert ROUTER.exists(), "vllm-router missing: scripts/install_router.sh"
    tmp = tmp_path_factory.mktemp("replicas")
    model = server.files_dir.parent / "model"  # the session server's demo checkpoint
    env = server_env(STTS_API_KEY=API_KEY, STTS_FILES_DIR=str(tmp / "files"))
    replicas = []
    for i in range(2):
        port = free_port()
        argv = [sys.executable, "-m", "server.cli", "--model", str(model), "--port", str(port)]
        replicas.append(Replica(port, tmp / f"replica-{i}.log", argv, env))
    with ExitStack() as stack:
        for replica in replicas:
            replica.start(stack)
        router_port, metrics_port = free_port(), free_port()
        stack.enter_context(
            server_process(
                _router([r.url for r in replicas], router_port, metrics_port),
                f"http://127.0.0.1:{router_port}",
                "/readiness",
                tmp / "router.log",
                server_env(),
            )
        )
        port = free_port()
        conf = _gateway_conf(replicas, router_port, port, tmp)
        stack.enter_context(
            server_process(
                [nginx, "-e", "stderr", "-c", str(conf), "-g", _NGINX_GLOBALS],
                f"http://127.0.0.1:{port}",
                "/health",
                tmp / "gateway.log",
                server_env(),
            )
        )
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        yield Deployment(f"http://127.0.0.1:{port}", replicas, stack, metrics)


def _clip(seed: int) -> bytes:
    return encode_video(moving_square_video(4, 48, 64, seed=seed), fps=4)


def _chat(
    client: httpx.Client,
    messages: list[dict],
    headers: dict[str, str] | None = None,
    **extra: object,
) -> httpx.Response:
    body = {"model": "stts-demo", "max_tokens": 2, "messages": messages} | extra
    return client.post("/v1/chat/completions", json=body, headers=headers)


def _turns(file_id: str) -> list[list[dict]]:
    first = {
        "role": "user",
        "content": [
            {"type": "video_url", "video_url": {"url": file_id}},
            {"type": "text", "text": "What happens?"},
        ],
    }
    history = [first, {"role": "assistant", "content": "A square moves."}]
    return [[first], [*history, {"role": "user", "content": "Which way?"}]]


def test_uploads_through_the_gateway_are_chatted_listed_and_deleted(
    deployment: Deployment,
) -> None:
    """50 uploads through the one front door land on both replicas in turn; each is used by
    a chat the router sends to either replica, listed and deleted through the same door."""
    before = [r.counts() for r in deployment.replicas]
    statuses: list[int] = []
    with deployment.client() as client:
        ids = []
        for i in range(50):
            files = {"file": (f"clip-{i}.mp4", _clip(100 + i), "video/mp4")}
            response = client.post("/v1/files", files=files, data={"purpose": "vision"})
            statuses.append(response.status_code)
            assert response.status_code == 200, response.text
            ids.append(response.json()["id"])
        uploaded = [r.counts() for r in deployment.replicas]
        for i, fid in enumerate(ids):
            answer = _chat(client, _turns(fid)[0], headers={"X-Session-Id": f"upload-{i}"})
            statuses.append(answer.status_code)
            assert answer.status_code == 200, answer.text
        chatted = [r.counts() for r in deployment.replicas]
        listed = {f["id"] for f in client.get("/v1/files").json()["data"]}
        assert set(ids) <= listed
        for fid in ids:
            response = client.delete(f"/v1/files/{fid}")
            statuses.append(response.status_code)
            assert response.status_code == 200, response.text
        assert not set(ids) & {f["id"] for f in client.get("/v1/files").json()["data"]}
    uploads = [a["upload"] - b["upload"] for a, b in zip(uploaded, before, strict=True)]
    chats = [a["chat"] - b["chat"] for a, b in zip(chatted, uploaded, strict=True)]
    assert sum(uploads) == 50 and min(uploads) > 0, uploads  # both replicas took uploads
    assert sum(chats) == 50 and min(chats) > 0, chats  # both answered about them
    assert not [s for s in statuses if s >= 500]


def test_a_conversation_with_a_session_key_stays_where_its_video_is(
    deployment: Deployment,
) -> None:
    """12 conversations, two turns each, keyed by `X-Session-Id` or `X-User-Id`: every
    second turn reaches the replica that decoded the video for the first (a decoded-frame
    cache hit there), and the conversations spread over both replicas. (The body's `user`
    field does not key them: vllm-router 0.1.17 hashes such video chats on one empty key.)"""
    with deployment.client() as client:
        ids = []
        for i in range(12):
            files = {"file": (f"conv-{i}.mp4", _clip(300 + i), "video/mp4")}
            ids.append(client.post("/v1/files", files=files, data={"purpose": "vision"}))
        ids = [r.json()["id"] for r in ids]
        before = [r.counts() for r in deployment.replicas]
        for i, fid in enumerate(ids):
            header = "X-Session-Id" if i % 2 else "X-User-Id"
            for messages in _turns(fid):
                response = _chat(client, messages, {header: f"conversation-{i}"})
                assert response.status_code == 200, response.text
        after = [r.counts() for r in deployment.replicas]
        for fid in ids:
            client.delete(f"/v1/files/{fid}")
    hits = sum(a["hit"] - b["hit"] for a, b in zip(after, before, strict=True))
    chats = [a["chat"] - b["chat"] for a, b in zip(after, before, strict=True)]
    assert hits == 12, (hits, chats)
    assert sum(chats) == 24 and min(chats) > 0, chats


def test_a_replica_killed_under_load_costs_few_requests_and_no_upload(
    deployment: Deployment,
) -> None:
    """Four clients stream conversations through the gateway; one replica is SIGKILLed, and
    started again on its port while they pause. Few requests fail, nothing hangs, the router
    sends to it again once it is ready, no request fails after that, and every upload is
    still there."""
    victim = deployment.replicas[-1]
    with deployment.client() as client:
        files = [
            client.post(
                "/v1/files",
                files={"file": (f"fault-{i}.mp4", _clip(500 + i), "video/mp4")},
                data={"purpose": "vision"},
            ).json()["id"]
            for i in range(8)
        ]
    stop, rejoined, paused = threading.Event(), threading.Event(), threading.Event()
    paused.set()  # set: the clients run
    results: list[tuple[bool, int, str]] = []  # (started after rejoin, status, error)

    def client_loop(w: int) -> None:
        with deployment.client() as client:
            i = w
            while not stop.is_set():
                after = rejoined.is_set()
                body = {
                    "model": "stts-demo",
                    "max_tokens": 8,
                    "stream": True,
                    "messages": _turns(files[i % len(files)])[0],
                }
                status, error = 0, ""
                try:
                    with client.stream(
                        "POST",
                        "/v1/chat/completions",
                        json=body,
                        headers={"X-Session-Id": f"fault-{i}"},
                        timeout=60,
                    ) as response:
                        status = response.status_code
                        text = "".join(response.iter_text())
                        if "[DONE]" not in text:
                            error = text[-200:] or "no [DONE]"
                except httpx.HTTPError as e:
                    error = repr(e)
                results.append((after, status, error))
                i += 4
                time.sleep(0.1)
                paused.wait()

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client_loop, w) for w in range(4)]
        try:
            time.sleep(5)
            before_kill = victim.counts()["chat"]
            assert before_kill > 0, "the victim served nothing before the kill"
            victim.kill()
            killed = time.monotonic()
            time.sleep(5)  # the clients go on: the router takes the victim out
            victim.reap()  # its engine too, as the container runtime would
            # On this 2-core machine every engine computes on core 0: under load the
            # restarting replica's start-up starves for minutes, so the clients wait for it.
            paused.clear()
            victim.start(deployment.stack)  # returns when its /ready answers
            paused.set()
            ready = time.monotonic() - killed
            base = victim.counts()["chat"]
            deadline = time.monotonic() + 60
            while victim.counts()["chat"] == base and time.monotonic() < deadline:
                time.sleep(0.5)
            routed_again = time.monotonic() - killed
            assert victim.counts()["chat"] > base, "the router never sent to the restarted one"
            rejoined.set()
            time.sleep(8)
        finally:
            stop.set()  # the clients stop whatever happened above
            paused.set()
            victim.reap()
        for future in futures:
            future.result(timeout=120)  # no client hangs
    failed = [r for r in results if r[1] != 200 or r[2]]
    print(
        f"\nfault: {len(results)} requests, {len(failed)} failed, replica ready "
        f"{ready:.1f} s and routed again {routed_again:.1f} s after the kill; "
        f"failures: {sorted({r[2][:120] for r in failed})}"
    )
    # What may fail: the stream each client had running on the victim (cut), and requests
    # the router sent there before its health check noticed (answered 500 once its retries
    # to the same key's replica ran out): at most two per client.
    assert len(failed) <= 8, failed
    assert not [r for r in results if r[0] and (r[1] != 200 or r[2])]
    assert len([r for r in results if r[0]]) >= 4  # served after the rejoin
    with deployment.client() as client:
        listed = {f["id"] for f in client.get("/v1/files").json()["data"]}
        assert set(files) <= listed
        for fid in files:
            assert client.delete(f"/v1/files/{fid}").status_code == 200


def test_the_dashboard_watches_router_metrics_that_exist(deployment: Deployment) -> None:
    """After the traffic and the fault above, every `vllm_router_*` name the Grafana
    dashboard plots is one the pinned router exports."""
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/stts-vllm.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    wanted = {m for e in exprs for m in re.findall(r"\bvllm_router_[a-z_]+", e)}
    assert wanted, "no router panels"
    text = httpx.get(deployment.router_metrics, timeout=10).text
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    # A counter appears at its first increment, and a retry happens only when a request
    # reached the killed replica before its health check failed: that one may be missing
    # from this run's /metrics, but the pinned router must still define it.
    assert wanted - exported <= LAZY_ROUTER_COUNTERS, sorted(wanted - exported)
    (extension,) = (ROOT / ".venv-router").glob("lib/python*/site-packages/vllm_router_rs*.so")
    defined = extension.read_bytes()
    assert all(name.encode() in defined for name in wanted - exported)
