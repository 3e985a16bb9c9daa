"""wsi-espnet: whole-slide histology segmentation with ESPNet."""

from .checkpoint import load_model, save_checkpoint
from .config import DatasetConfig, load_config
from .errors import UserError
from .espnet import ESPNet, ESPNetC, ESPModule, StridedESPModule, build_model

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
