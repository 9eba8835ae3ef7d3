"""STTS checkpoints: the format, and a converter for stock checkpoint directories.

A checkpoint is a plain HF directory (DESIGN.md §2): `config.json` names the plugin's
architecture and carries an `stts` block; weights stay ordinary safetensors, with the learned
scorer (if any) in its own file under the `stts_scorer.` prefix. vLLM, HF transformers and our
training code can therefore all read the same directory. `convert` makes one from a stock
directory, `derive` a view of one with other settings; the tiny random demo models are built
by `stts_vllm.demo`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stts_vllm.core.config import STTSConfig
from stts_vllm.families import FAMILIES, Family, family_of_config, resolve_stts

__all__ = [
    "SCORER_FILE",
    "SCORER_PREFIX",
    "STOCK_ARCHITECTURE",
    "STTS_ARCHITECTURE",
    "convert",
    "derive",
    "prepare_out_dir",
    "random_scorer_state_dict",
    "read_config",
    "scorer_state_dict_to_file",
    "set_architecture",
    "write_json",
    "write_stts_block",
]

# Qwen2.5-VL's, the first family (the demo's default)
STTS_ARCHITECTURE = FAMILIES[0].stts_architecture
STOCK_ARCHITECTURE = FAMILIES[0].stock_architecture
SCORER_PREFIX = "stts_scorer."
SCORER_FILE = "stts_scorer.safetensors"
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"


# --------------------------------------------------------------------------- json helpers
def read_config(ckpt_dir: Path) -> dict[str, Any]:
    """The raw `config.json` as a dict: we edit it as JSON, not through `PretrainedConfig`, so
    keys transformers does not know (the `stts` block) and the source's layout survive."""
    return json.loads((Path(ckpt_dir) / CONFIG_FILE).read_text())


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON the way transformers does; replace a symlink rather than write through it, so
    editing a converted directory can never modify the source checkpoint."""
    if path.is_symlink():
        path.unlink()
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def set_architecture(ckpt_dir: Path, arch: str) -> None:
    """Point `config.json` at another model class, e.g. `STOCK_ARCHITECTURE` for a baseline
    copy of a demo. (vLLM loads every `*.safetensors` of an index-less directory, so a stock
    copy of a `learned` demo must also drop `stts_scorer.safetensors`.)"""
    if not arch:
        raise ValueError("architecture name must be non-empty")
    config = read_config(ckpt_dir)
    config["architectures"] = [arch]
    write_json(Path(ckpt_dir) / CONFIG_FILE, config)


def derive(
    src: Path, out: Path, *, stts: Mapping[str, Any] | None = None, stock: bool = False
) -> Path:
    """A view of checkpoint `src` with other settings, weights linked, not copied: `stts`
    overrides fields of its `stts` block (e.g. `{"scorer": "random"}`); `stock=True` gives the
    same weights under the stock architecture (no `stts` block, no scorer file), as EVS and
    keep-1.0 baselines need."""
    src, out = Path(src), Path(out)
    out.mkdir(parents=True)
    for item in src.iterdir():
        if item.name == CONFIG_FILE or (stock and item.name == SCORER_FILE):
            continue
        (out / item.name).symlink_to(item.resolve())
    config = read_config(src)
    if stock:
        config["architectures"] = [family_of_config(config, str(src)).stock_architecture]
        config.pop("stts", None)
    write_json(out / CONFIG_FILE, config)
    if stts and not stock:
        write_stts_block(out, {**config.get("stts", {}), **stts})
    return out


def write_stts_block(ckpt_dir: Path, stts: Mapping[str, Any]) -> STTSConfig:
    """Validate `stts` (missing fields take their defaults) against the checkpoint's ViT and
    store it as the `stts` block of `config.json`."""
    parsed = STTSConfig.from_dict(dict(stts))
    config = read_config(ckpt_dir)
    parsed.check_vit_depth(_vit_depth(config))
    resolve_stts(parsed, family_of_config(config, str(Path(ckpt_dir) / CONFIG_FILE)))
    config["stts"] = parsed.to_dict()
    write_json(Path(ckpt_dir) / CONFIG_FILE, config)
    return parsed


def _vit_depth(config: Mapping[str, Any]) -> int:
    depth = config.get("vision_config", {}).get("depth")
    if not isinstance(depth, int):
        raise ValueError("config.json has no integer vision_config.depth")
    return depth


def _vit_width(config: Mapping[str, Any]) -> int:
    width = config.get("vision_config", {}).get("hidden_size")
    if not isinstance(width, int):
        raise ValueError("config.json has no integer vision_config.hidden_size")
    return width


def prepare_out_dir(out: Path, overwrite: bool, *, protect: Path | None = None) -> Path:
    """Create `out`, refusing to clobber a non-empty directory unless asked, and never deleting
    `protect` (the conversion source) by way of `overwrite`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if protect is not None:
        src = protect.resolve()
        if out.resolve() == src or out.resolve() in src.parents:
            raise ValueError(f"output directory {out} must not be or contain the source {protect}")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


# --------------------------------------------------------------------------- scorer weights
def random_scorer_state_dict(dim: int, hidden: int | None, seed: int) -> dict[str, torch.Tensor]:
    """A freshly initialised `STTSScorer`'s weights, prefixed, seeded on their own so they do
    not depend on what else was initialised first."""
    from stts_vllm.core import STTSScorer

    torch.manual_seed(seed)
    scorer = STTSScorer(dim=dim, hidden=hidden or dim)
    return {SCORER_PREFIX + k: v.detach() for k, v in scorer.state_dict().items()}


def scorer_state_dict_to_file(state_dict: Mapping[str, torch.Tensor], path: Path) -> Path:
    """Save scorer weights as the checkpoint expects them: keys under `stts_scorer.` (added
    where missing, so a bare `STTSScorer.state_dict()` works too), contiguous CPU tensors."""
    tensors = {
        (k if k.startswith(SCORER_PREFIX) else SCORER_PREFIX + k): v.detach().cpu().contiguous()
        for k, v in state_dict.items()
    }
    path = Path(path)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def _load_scorer_file(path: Path, vit_width: int) -> tuple[list[str], int | None]:
    """Check a scorer file before it enters a checkpoint: every key under `stts_scorer.` and the
    tensors loadable into `STTSScorer(dim=vit_width, hidden)`. Returns the keys and the
    `scorer_hidden_size` for the `stts` block (None when it equals the ViT width)."""
    from stts_vllm.core import STTSScorer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scorer weights {path} not found")
    tensors = load_file(str(path))
    stray = sorted(k for k in tensors if not k.startswith(SCORER_PREFIX))
    if stray:
        raise ValueError(
            f"scorer weights {path}: every key must start with {SCORER_PREFIX!r}; "
            f"found {stray[:5]}{' ...' if len(stray) > 5 else ''}"
        )
    first = tensors.get(SCORER_PREFIX + "mlp.0.weight")
    hidden = int(first.shape[0]) if first is not None else vit_width
    try:
        STTSScorer(dim=vit_width, hidden=hidden).load_state_dict(
            {k.removeprefix(SCORER_PREFIX): v for k, v in tensors.items()}
        )
    except RuntimeError as exc:
        raise ValueError(
            f"scorer weights {path} do not fit STTSScorer(dim={vit_width}, hidden={hidden}) "
            f"for this ViT: {exc}"
        ) from exc
    return sorted(tensors), (None if hidden == vit_width else hidden)


# --------------------------------------------------------------------------- convert
def _read_source_config(src: Path) -> tuple[dict[str, Any], Family]:
    """The source's config and family, after checking it is one STTS supports (stock or
    already STTS); anything else is refused with the supported architectures named."""
    if not src.is_dir():
        raise FileNotFoundError(f"source checkpoint directory {src} not found")
    if not (src / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{src} has no {CONFIG_FILE}; not a HF checkpoint directory")
    config = read_config(src)
    return config, family_of_config(config, str(src / CONFIG_FILE))


def _link_source_files(src: Path, out: Path) -> None:
    """Symlink everything of `src` into `out` except what conversion rewrites: the config,
    the shard index, and any previous scorer (the conversion defines the scorer anew)."""
    rewritten = {CONFIG_FILE, INDEX_FILE, SCORER_FILE}
    for entry in sorted(src.iterdir()):
        if entry.name not in rewritten:
            os.symlink(entry.absolute(), out / entry.name)


def _write_index(src_index: Path, out_index: Path, scorer_keys: list[str]) -> None:
    """vLLM loads only the shards an index names, so the scorer file must be in the index;
    a previous scorer's entries are replaced."""
    index = json.loads(src_index.read_text())
    weight_map = {k: v for k, v in index.get("weight_map", {}).items() if v != SCORER_FILE}
    weight_map |= dict.fromkeys(scorer_keys, SCORER_FILE)
    index["weight_map"] = dict(sorted(weight_map.items()))
    write_json(out_index, index)


def convert(
    src: Path,
    out: Path,
    *,
    keep_ratio: float = 0.5,
    prune_at: int = 3,
    scorer_weights: Path | None = None,
    bias_floor: float = -2.0,
    overwrite: bool = False,
) -> Path:
    """Make `out` an STTS view of the stock checkpoint `src` (Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE,
    Qwen3.5: the family is read from its `config.json`) without copying weights.

    Every file of `src` is symlinked except `config.json` (rewritten with the STTS
    architecture and `stts` block) and the shard index (rewritten to include the scorer).
    The scorer is `learned` when `scorer_weights` is given (copied in as
    `stts_scorer.safetensors`), else `heuristic`. Everything is validated before `out` is
    touched. Returns `out`.
    """
    src = Path(src)
    config, family = _read_source_config(src)
    scorer_keys: list[str] = []
    scorer_hidden: int | None = None
    if scorer_weights is not None:
        scorer_keys, scorer_hidden = _load_scorer_file(Path(scorer_weights), _vit_width(config))
    stts = STTSConfig(
        keep_ratio=keep_ratio,
        prune_at=prune_at,
        scorer="learned" if scorer_weights is not None else "heuristic",
        bias_floor=bias_floor,
        scorer_hidden_size=scorer_hidden,
    )
    stts.check_vit_depth(_vit_depth(config))
    resolve_stts(stts, family)
    out = prepare_out_dir(out, overwrite, protect=src)
    return _write_linked(src, out, config, family, stts, scorer_weights, scorer_keys)


def link_with_scorer(
    src: Path, out: Path, stts: Mapping[str, Any], scorer_weights: Path | None
) -> Path:
    """An STTS checkpoint in the new directory `out` with `src`'s weights linked, not copied,
    the `stts` block `stts` and the scorer of `scorer_weights`: what training writes when it
    changed only the scorer."""
    src, out = Path(src), Path(out)
    config, family = _read_source_config(src)
    scorer_keys: list[str] = []
    hidden: int | None = None
    if scorer_weights is not None:
        scorer_keys, hidden = _load_scorer_file(Path(scorer_weights), _vit_width(config))
    block = STTSConfig.from_dict({**stts, "scorer_hidden_size": hidden} if hidden else stts)
    block.check_vit_depth(_vit_depth(config))
    resolve_stts(block, family)
    out.mkdir(parents=True)
    return _write_linked(src, out, config, family, block, scorer_weights, scorer_keys)


def _write_linked(
    src: Path,
    out: Path,
    config: dict[str, Any],
    family: Family,
    stts: STTSConfig,
    scorer_weights: Path | None,
    scorer_keys: list[str],
) -> Path:
    _link_source_files(src, out)
    if scorer_weights is not None:
        shutil.copyfile(scorer_weights, out / SCORER_FILE)
    if (src / INDEX_FILE).is_file():
        _write_index(src / INDEX_FILE, out / INDEX_FILE, scorer_keys)
    config["architectures"] = [family.stts_architecture]
    config["stts"] = stts.to_dict()
    write_json(out / CONFIG_FILE, config)
    return out
