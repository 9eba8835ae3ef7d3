"""Shared test setup: tests import helpers from this folder (`media`) and from the load
tests' library (`chat_load`), whose server processes some tests share."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parents[1] / "loadtests"))
