"""The OpenAI-compatible API against a real server process and engine."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import httpx
import pytest
from media import encode_mp4, image, level_video, moving_square_video

from stts_vllm.core import retained_count
from tests.server.helpers import API_KEY, MAX_IN_FLIGHT, Server, metric_values

VIDEO = encode_mp4(moving_square_video(40, 224, 224, seed=1), fps=4)  # 10 s
VIDEO_URL = "data:video/mp4;base64," + base64.b64encode(VIDEO).decode()


def _messages(url: str, question: str = "What moves?") -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": {"url": url}},
                {"type": "text", "text": question},
            ],
        }
    ]


def test_video_question_non_streaming(server: Server) -> None:
    reply = server.openai().chat.completions.create(
        model="stts-demo", messages=_messages(VIDEO_URL), max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "length"  # greedy, 8 tokens: see the usage below
    stts = reply.model_extra["stts"]
    (video,) = stts["videos"]
    t, h, w = video["grid_thw"]
    assert video["frames_sampled"] == 20  # 10 s at the default 2 fps
    assert (t, h, w) == (10, 8, 8)  # 224 px frames: 8x8 units, 2 frames a step
    assert video["video_tokens_before"] == t * h * w
    assert video["video_tokens_after"] == retained_count(t, h * w, 0.5)
    assert stts["tokens_saved"] == t * h * w - retained_count(t, h * w, 0.5)
    assert reply.usage.prompt_tokens > video["video_tokens_after"]
    assert reply.usage.completion_tokens == 8


def test_video_question_streaming(server: Server) -> None:
    stream = server.openai().chat.completions.create(
        model="stts-demo",
        messages=_messages(VIDEO_URL),
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.usage.completion_tokens == 6
    assert usage_chunk.model_extra["stts"]["video_tokens_after"] > 0


def test_raw_sse_ends_with_done(server: Server) -> None:
    body = {"model": "stts-demo", "messages": _messages(VIDEO_URL), "max_tokens": 3, "stream": True}
    with (
        server.client() as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_uploaded_file_is_decoded_once(server: Server) -> None:
    client = server.openai()
    video = encode_mp4(moving_square_video(24, 168, 224, seed=2), fps=4)
    uploaded = client.files.create(file=("clip.mp4", video), purpose="vision")
    assert uploaded.id.startswith("file-") and uploaded.bytes == len(video)
    before = metric_values(server)
    replies = [
        client.chat.completions.create(
            model="stts-demo", messages=_messages(uploaded.id, q), max_tokens=3, temperature=0
        )
        for q in ("What moves?", "Which colour is it?")
    ]
    after = metric_values(server)
    cached = [r.model_extra["stts"]["videos"][0]["decode_cached"] for r in replies]
    assert cached == [False, True]
    hits = 'stts_video_decodes_total{cache="hit"}'
    misses = 'stts_video_decodes_total{cache="miss"}'
    assert after[hits] - before.get(hits, 0) == 1
    assert after[misses] - before.get(misses, 0) == 1
    decode_count = "stts_video_decode_seconds_count"
    assert after[decode_count] - before.get(decode_count, 0) == 1  # timed once: the miss
    # streaming works from a file id too
    stream = client.chat.completions.create(
        model="stts-demo", messages=_messages(uploaded.id), max_tokens=2, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_the_pruned_towers_calls_are_exported(server: Server) -> None:
    """The engine's encoder counters reach `/metrics`: two videos in one request are encoded
    together (one call of the pruned tower), with their time (exact on the CPU)."""
    client = server.openai()
    videos = [encode_mp4(moving_square_video(8, 112, 168, seed=40 + i), fps=4) for i in range(2)]
    urls = [f"data:video/mp4;base64,{base64.b64encode(v).decode()}" for v in videos]
    before = metric_values(server)
    content = [{"type": "video_url", "video_url": {"url": url}} for url in urls]
    reply = client.chat.completions.create(
        model="stts-demo",
        messages=[{"role": "user", "content": [*content, {"type": "text", "text": "?"}]}],
        max_tokens=2,
    )
    assert reply.choices[0].message.content is not None
    after = metric_values(server)

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert delta("stts_encoder_videos_total") == 2
    assert delta("stts_encoder_calls_total") == 1
    assert delta("stts_encoder_patches_total") > 0 and delta("stts_encoder_seconds_total") > 0
    assert after["stts_encoder_largest_call_patches"] >= delta("stts_encoder_patches_total")


def test_files_list_get_delete(server: Server) -> None:
    client = server.openai()
    video = encode_mp4(level_video(8), fps=4)
    uploaded = client.files.create(file=("levels.mp4", video), purpose="vision")
    assert client.files.retrieve(uploaded.id).filename == "levels.mp4"
    assert uploaded.id in [f.id for f in client.files.list().data]
    assert client.files.create(file=("again.mp4", video), purpose="vision").id == uploaded.id
    assert client.files.delete(uploaded.id).deleted
    with server.client() as http:
        missing = http.get(f"/v1/files/{uploaded.id}")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "file_not_found"


def _report(server: Server, stts: dict[str, Any], url: str = VIDEO_URL) -> dict[str, Any]:
    reply = server.openai().chat.completions.create(
        model="stts-demo", messages=_messages(url), max_tokens=1, extra_body={"stts": stts}
    )
    return reply.model_extra["stts"]


def test_keep_ratio_per_request(server: Server) -> None:
    half = _report(server, {"keep_ratio": 0.5, "test_time_scaling": False})
    third = _report(server, {"keep_ratio": 0.3, "test_time_scaling": False})
    full = _report(server, {"keep_ratio": 1.0})
    assert (
        half["video_tokens_before"] == third["video_tokens_before"] == full["video_tokens_before"]
    )
    assert full["video_tokens_after"] == full["video_tokens_before"]
    assert third["video_tokens_after"] < half["video_tokens_after"] < full["video_tokens_after"]
    assert third["keep_ratio"] == 0.3


def test_test_time_scaling_spends_savings_on_frames(server: Server) -> None:
    plain = _report(server, {"keep_ratio": 0.5, "test_time_scaling": False})
    scaled = _report(server, {"keep_ratio": 0.5, "test_time_scaling": True})
    assert scaled["test_time_scaling"] and not plain["test_time_scaling"]
    assert scaled["videos"][0]["frames_sampled"] == 2 * plain["videos"][0]["frames_sampled"]
    # about the unpruned model's token count, over twice the moments of the video
    unpruned = plain["video_tokens_before"]
    assert abs(scaled["video_tokens_after"] - unpruned) <= unpruned * 0.05


def test_sampling_options(server: Server) -> None:
    assert _report(server, {"num_frames": 8})["videos"][0]["frames_sampled"] == 8
    assert (
        _report(server, {"fps": 1.0, "test_time_scaling": False})["videos"][0]["frames_sampled"]
        == 10
    )
    assert (
        _report(server, {"max_frames": 6, "test_time_scaling": False})["videos"][0][
            "frames_sampled"
        ]
        == 6
    )


def _frames_with(server: Server, **extra: Any) -> int:
    reply = server.openai().chat.completions.create(
        model="stts-demo", messages=_messages(VIDEO_URL), max_tokens=1, extra_body=extra
    )
    return reply.model_extra["stts"]["videos"][0]["frames_sampled"]


def test_vllm_media_knobs_set_the_frame_plan(server: Server) -> None:
    """A client written for `vllm serve` (lmms-eval's `pass_video_url` sends media_io_kwargs)
    gets the frames it asked for; the 10 s video has 20 frames at the default 2 fps."""
    assert _frames_with(server, media_io_kwargs={"video": {"num_frames": 8}}) == 8
    assert _frames_with(server, media_io_kwargs={"video": {"fps": 1.0}}) == 10
    assert _frames_with(server, mm_processor_kwargs={"num_frames": 6}) == 6
    assert _frames_with(server, mm_processor_kwargs={"fps": 0.5}) == 5
    assert _frames_with(server, mm_processor_kwargs={"max_frames": 7}) == 7
    # the same value from two sources is no conflict
    assert _frames_with(server, stts={"num_frames": 4}, mm_processor_kwargs={"num_frames": 4}) == 4
    reply = server.openai().chat.completions.create(
        model="stts-demo",
        messages=_messages(VIDEO_URL),
        max_tokens=1,
        extra_body={"mm_processor_kwargs": {"stts_keep_ratio": 0.25}},
    )
    assert reply.model_extra["stts"]["keep_ratio"] == 0.25


@pytest.mark.parametrize(
    ("extra", "param", "text"),
    [
        (
            {"stts": {"num_frames": 8}, "media_io_kwargs": {"video": {"num_frames": 4}}},
            "media_io_kwargs.video.num_frames",
            "conflicts with stts.num_frames=8",
        ),
        (
            {"mm_processor_kwargs": {"stts_keep_ratio": 0.3}, "stts": {"keep_ratio": 0.5}},
            "mm_processor_kwargs.stts_keep_ratio",
            "conflicts with stts.keep_ratio=0.5",
        ),
        ({"mm_processor_kwargs": {"max_pixels": 9999}}, "mm_processor_kwargs.max_pixels", ""),
        ({"media_io_kwargs": {"image": {"x": 1}}}, "media_io_kwargs.image", ""),
        ({"media_io_kwargs": {"video": {"fps": 0}}}, "media_io_kwargs.video.fps", "greater"),
    ],
)
def test_vllm_media_knobs_refused_when_they_conflict(
    server: Server, extra: dict, param: str, text: str
) -> None:
    body = {"model": "stts-demo", "messages": _messages(VIDEO_URL), "max_tokens": 1} | extra
    with server.client() as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and text in error["message"], error


def test_video_as_frame_images(server: Server) -> None:
    """lmms-eval / cookbook style: a run of image_url frames, or a list in video_url."""
    frames = []
    for seed in range(6):
        buffer = __import__("io").BytesIO()
        image(112, 112, seed=seed).save(buffer, format="PNG")
        frames.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    as_images = [
        {
            "role": "user",
            "content": [
                *({"type": "image_url", "image_url": {"url": u}} for u in frames),
                {"type": "text", "text": "What changes?"},
            ],
        }
    ]
    client = server.openai()
    reply = client.chat.completions.create(
        model="stts-demo",
        messages=as_images,
        max_tokens=1,
        extra_body={"stts": {"frames_as_video": True}},
    )
    (video,) = reply.model_extra["stts"]["videos"]
    assert (
        video["frames_sampled"] == 6 and video["video_tokens_after"] < video["video_tokens_before"]
    )
    listed = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": frames}}]}]
    reply = client.chat.completions.create(model="stts-demo", messages=listed, max_tokens=1)
    assert reply.model_extra["stts"]["videos"][0]["frames_sampled"] == 6


def test_image_and_text_only(server: Server) -> None:
    buffer = __import__("io").BytesIO()
    image(140, 196).save(buffer, format="JPEG")
    url = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    client = server.openai()
    reply = client.chat.completions.create(
        model="stts-demo",
        max_tokens=2,
        temperature=0.8,
        n=2,
        seed=3,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "Describe."},
                ],
            }
        ],
    )
    assert len(reply.choices) == 2 and reply.model_extra.get("stts") is None
    text = client.chat.completions.create(
        model="stts-demo",
        max_tokens=2,
        stop=["\n"],
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    )
    assert text.usage.prompt_tokens > 0


def test_models_health_ready(server: Server) -> None:
    with server.client() as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/ready").status_code == 200
        models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["stts-demo"]


def test_metrics_parse_and_move(server: Server) -> None:
    before = metric_values(server)
    server.openai().chat.completions.create(
        model="stts-demo",
        messages=_messages(VIDEO_URL, "Again?"),
        max_tokens=4,
        extra_body={"stts": {"keep_ratio": 0.4}},
    )
    after = metric_values(server)
    moved = [
        'stts_requests_total{route="/v1/chat/completions",status="200"}',
        'stts_request_duration_seconds_count{route="/v1/chat/completions"}',
        "stts_time_to_first_token_seconds_count",
        "stts_time_per_output_token_seconds_count",
        "stts_frames_sampled_total",
        "stts_video_tokens_before_pruning_total",
        "stts_video_tokens_after_pruning_total",
        "stts_video_tokens_saved_total",
    ]
    for name in moved:
        assert after[name] > before.get(name, 0), name
    for name in (
        "stts_video_decode_seconds_count",
        "stts_requests_in_flight",
        "stts_requests_queued",
        "stts_requests_rejected_total",
    ):
        assert name in after, name
    assert any(k.startswith("vllm:") for k in after)  # vLLM's own metrics, same endpoint


def test_concurrent_requests_all_succeed(server: Server) -> None:
    videos = [
        "data:video/mp4;base64,"
        + base64.b64encode(
            encode_mp4(moving_square_video(8 + 4 * (i % 3), 112, 112, seed=100 + i), fps=4)
        ).decode()
        for i in range(32)
    ]

    async def run() -> list[int]:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=300) as c:
            replies = await asyncio.gather(
                *(
                    c.post(
                        "/v1/chat/completions",
                        json={"model": "stts-demo", "messages": _messages(url), "max_tokens": 4},
                    )
                    for url in videos
                )
            )
        return [r.status_code for r in replies]

    assert asyncio.run(run()) == [200] * 32


def test_overload_is_refused_with_retry_after(server: Server) -> None:
    async def run() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        body = {"model": "stts-demo", "messages": _messages(VIDEO_URL), "max_tokens": 16}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=300) as c:
            return await asyncio.gather(
                *(c.post("/v1/chat/completions", json=body) for _ in range(MAX_IN_FLIGHT + 20))
            )

    replies = asyncio.run(run())
    codes = sorted({r.status_code for r in replies})
    assert codes == [200, 429]
    refused = next(r for r in replies if r.status_code == 429)
    assert refused.headers["retry-after"] and refused.json()["error"]["code"] == "overloaded"
    reply = server.openai().chat.completions.create(
        model="stts-demo", messages=_messages(VIDEO_URL), max_tokens=1
    )
    assert reply.choices


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic test-key"])
def test_api_key_required(server: Server, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    reply = httpx.get(f"{server.url}/v1/models", headers=headers)
    assert reply.status_code == 401
    assert reply.json()["error"]["type"] == "authentication_error"


def _sum(server: Server, prefix: str, label: str = "") -> float:
    return sum(v for k, v in metric_values(server).items() if k.startswith(prefix) and label in k)


def _wait_for_abort(server: Server, disconnects_before: float) -> None:
    """The handler saw the client leave (a 499), and the engine stopped generating: without
    the abort the 4000-token request would keep producing tokens for many seconds."""
    import time

    status = 'status="499"'
    deadline = time.monotonic() + 20
    while _sum(server, "stts_requests_total", status) <= disconnects_before:
        assert time.monotonic() < deadline, "the server never noticed the client leave"
        time.sleep(0.2)
    time.sleep(0.5)
    generated = _sum(server, "vllm:generation_tokens_total")
    time.sleep(2.0)
    assert _sum(server, "vllm:generation_tokens_total") == generated


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_engine_request(server: Server, stream: bool) -> None:
    before = _sum(server, "stts_requests_total", 'status="499"')
    body = {
        "model": "stts-demo",
        "messages": [{"role": "user", "content": "Count to a lot."}],
        "max_tokens": 4000,
        "ignore_eos": True,
        "stream": stream,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if stream:
        with (
            httpx.Client(base_url=server.url, headers=headers, timeout=60) as client,
            client.stream("POST", "/v1/chat/completions", json=body) as response,
        ):
            assert response.status_code == 200
            next(response.iter_lines())  # the first chunk, then hang up
    else:
        with (
            httpx.Client(base_url=server.url, headers=headers, timeout=1.0) as client,
            pytest.raises(httpx.ReadTimeout),
        ):
            client.post("/v1/chat/completions", json=body)
    _wait_for_abort(server, before)


def test_test_time_scaling_is_on_by_default_for_long_videos(server: Server) -> None:
    long_video = encode_mp4(moving_square_video(40, 112, 112, seed=7), fps=1)  # 40 s
    url = "data:video/mp4;base64," + base64.b64encode(long_video).decode()
    report = _report(server, {"keep_ratio": 0.5}, url=url)
    assert report["test_time_scaling"]
    assert report["videos"][0]["frames_sampled"] == 40  # 2 fps x 40 s = 80 wanted, 40 exist
    short = _report(server, {"keep_ratio": 0.5})  # the 10 s video
    assert not short["test_time_scaling"]


def test_eval_through_the_http_api(server: Server, tmp_path: Path) -> None:
    """`stts-vllm eval --server URL`: the same questions as offline, as frame lists over HTTP;
    the server reports the video tokens it really used."""
    from stts_vllm.eval.config import EvalConfig
    from stts_vllm.eval.run import run_eval

    config = EvalConfig(
        checkpoint=Path("-"),
        out=tmp_path / "eval",
        samples=2,
        ratios=(0.5,),
        methods=(),
        long=True,
        distractor=True,
        selections=None,
        server=server.url,
        api_key=API_KEY,
        compare_hf=0,
    )
    rows = {r["mode"]: r for r in run_eval(config)["results"]}
    assert set(rows) == {
        "test/none/16f",
        "test/server@0.5/16f",
        "long/none/16f",
        "long/server@0.5/32f",
    }
    assert rows["test/none/16f"]["video_tokens_mean"] == 288
    assert rows["test/server@0.5/16f"]["video_tokens_mean"] == 144
    assert rows["long/server@0.5/32f"]["video_tokens_mean"] == 288
    assert (tmp_path / "eval" / "eval.png").is_file()
