"""The short real training runs every training test may ask for (see `helpers`)."""

from tests.training.helpers import qwen3_scorer_run, smoke_run

__all__ = ["qwen3_scorer_run", "smoke_run"]
