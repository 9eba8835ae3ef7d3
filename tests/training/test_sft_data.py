"""`stts-vllm train --data`: the LLaVA / Qwen-VL layout and the OpenAI chat shape read into one
conversation form; each kind of bad record an error naming its file and line, or, with
`skip_bad`, skipped and counted."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from media import encode_video, image, moving_square_video

from stts_vllm.training.sft_data import Part, RecordError, read_records


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sft")
    (root / "clips").mkdir()
    for i in range(2):
        clip = encode_video(moving_square_video(8, 64, 80, seed=i), fps=4)
        (root / "clips" / f"c{i}.mp4").write_bytes(clip)
    image(32, 48).save(root / "clips" / "p.png")
    (root / "clips" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    return root


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


LLAVA = {
    "video": "clips/c0.mp4",
    "conversations": [
        {"from": "human", "value": "<video>\nWhat moves?"},
        {"from": "gpt", "value": "A square."},
        {"from": "human", "value": "Which way?"},
        {"from": "gpt", "value": "Right."},
    ],
}


def test_a_llava_record_is_a_conversation_with_its_video_in_place(root: Path) -> None:
    records, report = read_records([_jsonl(root / "a.jsonl", [LLAVA])], root)
    (record,) = records
    assert report.summary()["skipped"] == 0 and report.records == 1
    assert [t.role for t in record.turns] == ["user", "assistant", "user", "assistant"]
    assert record.turns[0].parts == (Part(media=0), Part(text="What moves?"))
    assert record.media[0].kind == "video" and record.media[0].source == root / "clips/c0.mp4"
    assert record.turns[3].text() == "Right."
    assert record.where == f"{root / 'a.jsonl'}:1"


def test_a_json_list_with_several_videos_and_an_image(root: Path) -> None:
    rows = [
        LLAVA,
        {
            "video": ["clips/c0.mp4", "clips/c1.mp4"],
            "image": "clips/p.png",
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "<video> then <video>, and <image>?"},
                {"from": "gpt", "value": "Two clips, one picture."},
            ],
        },
    ]
    path = root / "list.json"
    path.write_text(json.dumps(rows, indent=2))
    records, _ = read_records([path], root)
    second = records[1]
    starts = [n for n, line in enumerate(path.read_text().splitlines(), 1) if line == "  {"]
    assert second.where == f"{path}:{starts[1]}"  # the line where its object starts
    assert [m.kind for m in second.media] == ["video", "video", "image"]
    parts = second.turns[1].parts
    assert [p.media for p in parts if p.media is not None] == [0, 1, 2]
    assert second.turns[0].role == "system"


def test_llava_video_data_may_mark_its_video_with_image(root: Path) -> None:
    """LLaVA-Video-178K writes `<image>` for the video of a video record."""
    row = LLAVA | {
        "conversations": [{"from": "human", "value": "<image>\nQ?"}, LLAVA["conversations"][1]]
    }
    (record,), _ = read_records([_jsonl(root / "b.jsonl", [row])], root)
    assert record.media[0].kind == "video" and record.turns[0].parts[0] == Part(media=0)


def test_the_openai_shape_with_paths_file_urls_and_data_urls(root: Path) -> None:
    clip = (root / "clips/c1.mp4").read_bytes()
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": "clips/c0.mp4"}},
                    {"type": "video_url", "video_url": {"url": f"file://{root}/clips/c1.mp4"}},
                    {
                        "type": "video_url",
                        "video_url": {
                            "url": "data:video/mp4;base64," + base64.b64encode(clip).decode()
                        },
                    },
                    {"type": "text", "text": "Compare them."},
                ],
            },
            {"role": "assistant", "content": "They match."},
        ]
    }
    (record,), _ = read_records([_jsonl(root / "o.jsonl", [row])], root)
    assert [m.source for m in record.media[:2]] == [root / "clips/c0.mp4", root / "clips/c1.mp4"]
    assert record.media[2].source == clip
    assert record.turns[1].parts[-1] == Part(text="Compare them.")


BAD = {
    "missing_file": LLAVA | {"video": "clips/nope.mp4"},
    "no_assistant_turn": LLAVA | {"conversations": LLAVA["conversations"][:1]},
    "placeholder_mismatch": LLAVA | {"video": ["clips/c0.mp4", "clips/c1.mp4"]},
    "undecodable_video": LLAVA | {"video": "clips/broken.mp4"},
    "invalid_record": {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_each_bad_record_is_an_error_naming_file_and_line(root: Path, kind: str) -> None:
    path = _jsonl(root / f"bad-{kind}.jsonl", [LLAVA, BAD[kind]])
    with pytest.raises(RecordError) as caught:
        read_records([path], root)
    assert caught.value.kind == kind
    assert str(caught.value).startswith(f"{path}:2: "), str(caught.value)


def test_skip_bad_counts_every_kind(root: Path) -> None:
    path = root / "mixed.jsonl"
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in [LLAVA, *BAD.values(), LLAVA]) + "{not json\n"
    )
    records, report = read_records([path], root, skip_bad=True)
    assert len(records) == 2
    summary = report.summary()
    assert summary["skipped"] == len(BAD) + 1
    assert summary["skipped_by_kind"] == dict.fromkeys([*BAD, "invalid_json"], 1)
    assert summary["first_errors"][0].startswith(f"{path}:2: ")


def test_a_relative_path_without_a_video_root_is_refused(root: Path) -> None:
    with pytest.raises(RecordError, match="give --video-root"):
        read_records([_jsonl(root / "c.jsonl", [LLAVA])], None)
