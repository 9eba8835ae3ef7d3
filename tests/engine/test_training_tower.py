"""The training tower (transformers' modules) equals the serving tower (vLLM's live model) on
the same checkpoint, for every family: same kept units, same embeddings (deepstack included).
Both run `stts_vllm.core.driver`; only the adapters differ, and this is what binds them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from stts_vllm.core import STTSScorer
from stts_vllm.pruned_vision import pruned_vision_forward as serving_forward
from stts_vllm.training.hf_vision import pruned_vision_forward as training_forward
from tests.engine.helpers import live_model

pytestmark = pytest.mark.float32_exact

CASES = {
    # name: (checkpoint fixture, transformers class, patch, grids in patches)
    "qwen2_5_vl": ("demo_ckpt", "Qwen2_5_VLForConditionalGeneration", 14, [(4, 20, 28), (2, 8, 8)]),
    "qwen3_vl": ("qwen3_ckpt", "Qwen3VLForConditionalGeneration", 16, [(4, 10, 14), (3, 6, 6)]),
    "qwen3_vl-learned": (
        "qwen3_learned_ckpt",
        "Qwen3VLForConditionalGeneration",
        16,
        [(5, 8, 12)],
    ),
}


def _pixels(grids: list, patch: int) -> torch.Tensor:
    """Patch rows in processor order where every unit changes between steps by its own,
    widely spaced amount: scores far apart, so float rounding between the two frameworks
    cannot flip a unit across the cut (the units must be the same to compare outputs)."""
    gen = torch.Generator().manual_seed(3)
    items = []
    for t, h, w in grids:
        units = (h // 2) * (w // 2)
        base = torch.randn(1, units, 4, 3 * 2 * patch * patch, generator=gen)
        change = torch.randn(t, units, 4, base.shape[-1], generator=gen)
        amplitude = 4 * (torch.randperm(units, generator=gen) + 1).float() / units
        items.append((base + amplitude.view(1, -1, 1, 1) * change).reshape(-1, base.shape[-1]))
    return torch.cat(items)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("keep", [1.0, 0.5, 0.3])
@torch.inference_mode()
def test_training_tower_equals_serving_tower(
    request: pytest.FixtureRequest, engines, case: str, keep: float
) -> None:
    import transformers

    fixture, hf_class, patch, grids = CASES[case]
    ckpt: Path = request.getfixturevalue(fixture)
    served: Any = live_model(engines.get(ckpt))
    device = served.visual.device
    hf = getattr(transformers, hf_class).from_pretrained(ckpt, dtype=torch.float32)
    hf = hf.eval().to(device)
    scorer = None
    if served.stts_scorer is not None:
        scorer = STTSScorer(served.config.vision_config.hidden_size).float().to(device)
        scorer.load_state_dict(served.stts_scorer.state_dict())
    config = served.stts_config
    pixels = _pixels(grids, patch).to(device)
    keeps = [keep] * len(grids)
    ours = serving_forward(
        served.visual,
        pixels,
        grids,
        keeps,
        config=config,
        scorer=served.stts_scorer,
        selection=config.selection,
    )
    # vLLM normalises pixels in the tower (`input_norm`); transformers' processor does it
    normalized = served.visual.input_norm(pixels, served.visual.dtype)
    theirs = training_forward(
        hf.model.visual,
        normalized,
        grids,
        keeps,
        config=config,
        scorer=scorer,
        selection=config.selection,
    )
    for a, b in zip(ours.keep_masks, theirs.keep_masks, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    for a, b in zip(ours.embeds, theirs.embeds, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("keep", [0.5, 1.0, 0.3])
def test_vllm_gives_the_qwen3_training_models_logprobs(
    engines, qwen3_learned_ckpt: Path, keep: float
) -> None:
    """The whole training model (per-step timestamps in the prompt, kept units at their
    positions, deepstack added in the LLM) gives vLLM's first-token logprobs."""
    from vllm import SamplingParams

    from stts_vllm.eval.runners import video_metadata
    from stts_vllm.training.model import STTSVideoQAModel, chat_prompt
    from stts_vllm.training.videoqa import make_sample

    samples = [make_sample(i, "test") for i in range(3)]
    model = STTSVideoQAModel.from_checkpoint(qwen3_learned_ckpt).eval()
    with torch.no_grad():
        out = model([model.prepare(s) for s in samples], [keep] * len(samples))
    results = engines.get(qwen3_learned_ckpt).generate(
        [
            {
                "prompt": chat_prompt(model.tokenizer, s.question),
                "multi_modal_data": {"video": [(s.frames, video_metadata(s))]},
                "mm_processor_kwargs": {"stts_keep_ratio": keep},
            }
            for s in samples
        ],
        SamplingParams(temperature=0.0, max_tokens=1, logprobs=5),
        use_tqdm=False,
    )
    for result, item, logits, tokens in zip(
        results, samples, out.answer_logits, out.video_tokens, strict=True
    ):
        prepared = model.prepare(item)
        assert result.prompt_token_ids.count(model.video_pad) == tokens
        assert result.prompt_token_ids.count(model.vision_start) == 1 + len(prepared.step_texts)
        hf = torch.log_softmax(logits.float(), dim=-1)
        assert result.outputs[0].token_ids[0] == int(hf.argmax())
        for token_id, logprob in result.outputs[0].logprobs[0].items():
            assert abs(logprob.logprob - float(hf[token_id])) < 1e-3, (token_id, logprob)
