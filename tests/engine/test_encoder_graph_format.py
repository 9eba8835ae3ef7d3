"""Images keep vLLM's encoder CUDA graphs under pruning mode: the graph path's output, once
post-processed by the model, is exactly what the eager path gives (embeddings plus position
columns). CPU has no CUDA graphs, but the manager's graph and eager-fallback paths share the
forward and the post-processing checked here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from stts_vllm.positions import POSITION_COLUMNS
from tests.engine.helpers import live_model


def _images(visual_config: Any, grids: list[tuple[int, int, int]]) -> dict[str, Any]:
    patch = visual_config.temporal_patch_size * visual_config.patch_size**2 * 3
    patches = sum(t * h * w for t, h, w in grids)
    generator = torch.Generator().manual_seed(0)
    return {
        "pixel_values": torch.randn(patches, patch, generator=generator),
        "image_grid_thw": torch.tensor(grids),
    }


@pytest.mark.parametrize("ckpt_name", ["demo_ckpt", "qwen3_ckpt"])
def test_graph_path_images_match_the_eager_format(
    engines, ckpt_name: str, request: pytest.FixtureRequest
) -> None:
    ckpt: Path = request.getfixturevalue(ckpt_name)
    model = live_model(engines.get(ckpt))
    config = model.get_encoder_cudagraph_config()
    assert config.modalities == ["image"]  # stock would be [] in pruning mode
    merge = model.config.vision_config.spatial_merge_size
    grids = [(1, 2 * merge, 4 * merge), (1, 4 * merge, 2 * merge)]
    batch = _images(model.config.vision_config, grids)
    batch["pixel_values"] = batch["pixel_values"].to(model.visual.device, model.visual.dtype)

    with torch.inference_mode():
        eager = model.embed_multimodal(**batch)
        # What the manager does: select a sub-batch (here in reverse order), run it, post-process.
        selected = model.select_encoder_cudagraph_items(batch, [1, 0])
        raw = model.encoder_eager_forward(selected)
        out_tokens = [spec.output_tokens for spec in model.get_encoder_cudagraph_item_specs(batch)]
        dest: dict[int, torch.Tensor] = {}
        model.postprocess_encoder_output(
            {"default": raw}, [1, 0], out_tokens, dest, clone=True, batch_mm_kwargs=selected
        )

    assert config.out_hidden_size == eager[0].shape[1]
    for index, expected in enumerate(eager):
        got = dest[index]
        assert got.shape == expected.shape
        torch.testing.assert_close(got[:, -POSITION_COLUMNS:], expected[:, -POSITION_COLUMNS:])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
