"""wsi-espnet: whole-slide histology segmentation with ESPNet."""

from __future__ import annotations

import importlib
from typing import Any

from .config import DatasetConfig, load_config
from .errors import UserError

# The PyTorch names load on first use, so that an edge install without torch (ONNX Runtime backend)
# can import the package and its torch-free modules.
_LAZY = {
    "load_model": "checkpoint",
    "save_checkpoint": "checkpoint",
    "ESPModule": "espnet",
    "ESPNet": "espnet",
    "ESPNetC": "espnet",
    "StridedESPModule": "espnet",
    "build_model": "espnet",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ESPModule",
    "ESPNet",
    "ESPNetC",
    "StridedESPModule",
    "DatasetConfig",
    "UserError",
    "build_model",
    "load_config",
    "load_model",
    "save_checkpoint",
]
__version__ = "0.1.0"
