"""edgetune: fine-tune language-model adapters on the device that uses them.

The device-side API needs only onnxruntime (any current release), numpy and tokenizers::

    import edgetune
    run = edgetune.train("bundle/", data="data/", out="run/", steps=100)
    print(edgetune.evaluate("bundle/", "data/test.jsonl", adapter="run/"))
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import EdgetuneError  # noqa: E402


def __getattr__(name: str):  # lazy so ``import edgetune`` stays cheap on a device
    if name in ("train", "Trainer"):
        from . import trainer as _t

        return getattr(_t, name)
    if name in ("evaluate", "generate", "Model"):
        from . import infer as _i

        return getattr(_i, name)
    raise AttributeError(name)


__all__ = ["EdgetuneError", "__version__", "train", "Trainer", "evaluate", "generate", "Model"]
