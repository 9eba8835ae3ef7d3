"""Makes PyPI's torchvision importable beside the CPU torch wheel (run with the venv's python).

The torchvision that pip resolves next to `torch==2.13.0+cpu` is a CUDA build whose compiled ops
do not load here; its fake-kernel registrations for `nms`/`qnms` then fail at import ("operator
torchvision::nms does not exist"). This guards them on the ops being present. Idempotent; the
file is found without importing torchvision (which is what fails).
"""

import importlib.util
import pathlib

spec = importlib.util.find_spec("torchvision")
if spec is not None and spec.origin is not None:
    path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
    src = path.read_text()
    for op in ("nms", "qnms"):
        old = f'@torch.library.register_fake("torchvision::{op}")'
        new = (
            f'@(torch.library.register_fake("torchvision::{op}") '
            "if torchvision.extension._has_ops() else (lambda f: f))"
        )
        src = src.replace(old, new)
    path.write_text(src)
