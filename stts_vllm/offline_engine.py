"""One in-process `vllm.LLM` at a time, reopened only when the checkpoint or its settings
change: an engine holds a KV cache and the process's distributed state, so the previous one is
closed (and that state torn down) before the next starts. Used by the eval and the engine tests."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any


class EngineCache:
    def __init__(self, defaults: dict[str, Any]) -> None:
        self.defaults = defaults
        self._key: tuple | None = None
        self._llm: Any = None

    def get(self, checkpoint: Path, **overrides: Any) -> Any:
        from vllm import LLM

        key = (str(checkpoint), repr(sorted(overrides.items())))
        if key != self._key:
            self.close()
            self._llm = LLM(model=str(checkpoint), **(self.defaults | overrides))
            self._key = key
        return self._llm

    def close(self) -> None:
        if self._llm is None:
            return
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        self._llm = self._key = None
        gc.collect()
        cleanup_dist_env_and_memory()
