"""Dataset configuration: what the classes are, how pixels are normalised, at what resolution slides
are read.  One YAML file per data set in ``configs/``; everything downstream takes these dataclasses,
never raw dictionaries, so a typo in a config fails at load time and not in the middle of a slide.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .errors import UserError

# In a wheel the YAML files are inside the package (pyproject's package-dir); in a checkout (and an
# editable install of it) they are in configs/ at its top.
_PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"
CONFIG_DIR = _PACKAGED_CONFIGS if _PACKAGED_CONFIGS.is_dir() else Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class ClassInfo:
    name: str
    color: tuple[int, int, int]


@dataclass(frozen=True)
class Normalization:
    """Pixel normalisation: ``((x[..., order] - mean) / std) / extra_scale``.

    ``extra_scale`` exists because the authors' released models were trained with one more division
    by 255 after the usual mean/std step; reproducing their outputs needs it.
    """

    channel_order: str = "RGB"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (255.0, 255.0, 255.0)
    extra_scale: float = 1.0

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 RGB (..., H, W, 3) to float32 normalised, still channels-last."""
        x = rgb.astype(np.float32)
        if self.channel_order.upper() == "BGR":
            x = x[..., ::-1]
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.extra_scale != 1.0:
            x = x / np.float32(self.extra_scale)
        return x

    def as_affine(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-input-RGB-channel (scale, shift) so that normalised = rgb * scale + shift, in model
        channel order.  Lets the fast paths fuse normalisation into one multiply-add on the device."""
        mean = np.asarray(self.mean, np.float64)
        std = np.asarray(self.std, np.float64)
        scale = 1.0 / (std * self.extra_scale)
        shift = -mean / (std * self.extra_scale)
        return scale.astype(np.float32), shift.astype(np.float32)


@dataclass(frozen=True)
class SlideSettings:
    mpp: float = 1.0
    tile: int = 512
    overlap: int = 72  # the stride, 440, stays a multiple of ESPNet's 8; see README, fidelity
    tissue_threshold: float = 0.05


@dataclass(frozen=True)
class ModelSettings:
    variant: str = "espnet"  # "espnet" or "espnet_c"
    p: int = 2
    q: int = 8
    skip: str = "level1"  # decoder skip: "level1" (16 ch) or "level1_reinforced" (19 ch)


@dataclass(frozen=True)
class TrainSettings:
    encoder_epochs: int = 30
    decoder_epochs: int = 30
    batch_size: int = 8
    lr: float = 5e-4
    crop: tuple[int, int] = (256, 256)
    workers: int = 0
    seed: int = 0
    weight_decay: float = 5e-4  # the authors' Adam weight decay
    steps_per_epoch: int = 0  # 0: one pass over the training set (with class-balanced sampling)


@dataclass(frozen=True)
class DataSettings:
    layout: str = "slides"  # slides | bcss | cityscapes | voc
    root: str = "data"
    # Annotated slides and tissue tiles (see wsi_espnet.annotations / wsi_espnet.datasets):
    unknown_classes: str = "error"  # annotation class names not in `classes`: error | ignore
    unannotated: str = "ignore"  # pixels no annotation covers: ignore, or a class name
    min_labelled: float = 0.25  # keep a training patch when at least this share is labelled
    class_map: dict | None = None  # label-image code -> class name (BCSS codes); unlisted codes ignored
    mpp: float | None = None  # µm/px of image-folder data when the file names do not say it


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    classes: tuple[ClassInfo, ...]
    normalization: Normalization = field(default_factory=Normalization)
    ignore_index: int = 255
    input_size: tuple[int, int] | None = None  # (width, height) for whole-image prediction
    slide: SlideSettings = field(default_factory=SlideSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def palette(self) -> np.ndarray:
        """(num_classes, 3) uint8 colours, indexable by class id."""
        return np.asarray([c.color for c in self.classes], np.uint8).reshape(-1, 3)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls, data: dict | None, where: str):
    data = dict(data or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(names))}")
    for f in dataclasses.fields(cls):
        if f.name in data and isinstance(data[f.name], list):
            data[f.name] = tuple(data[f.name])
        if f.name in data:
            data[f.name] = _coerce(data[f.name], str(f.type), f"{where}: {f.name}")
    return cls(**data)


def _coerce(value: Any, kind: str, where: str) -> Any:
    """Numbers as their field's type: YAML reads ``1e-3`` (no dot) as a string, and an int where a
    float is meant is harmless but a float where an int is meant is not."""
    kind = kind.replace(" ", "")
    if kind in ("float", "float|None") and value is not None and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where} must be a number, got {value!r}") from None
    if kind in ("int", "int|None") and value is not None and not isinstance(value, bool):
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where} must be an integer, got {value!r}") from None
        if not f.is_integer():
            raise UserError(f"{where} must be an integer, got {value!r}")
        return int(f)
    return value


def config_from_dict(raw: dict[str, Any], where: str = "config") -> DatasetConfig:
    """Build a config from a plain dict (a YAML file, or the copy stored inside a checkpoint)."""
    if not isinstance(raw, dict) or "classes" not in raw or "name" not in raw:
        raise UserError(f"{where}: a config needs at least 'name' and 'classes'")
    classes = []
    for i, c in enumerate(raw["classes"]):
        if isinstance(c, str):
            c = {"name": c, "color": [0, 0, 0]}
        name = str(c["name"])
        if ":" in name:
            raise UserError(f"{where}: class name {name!r} contains ':' (QuPath reads it as a sub-class)")
        color = tuple(int(v) for v in c.get("color", (0, 0, 0)))
        if len(color) != 3 or not all(0 <= v <= 255 for v in color):
            raise UserError(f"{where}: class {name!r} needs an [r, g, b] colour in 0-255")
        classes.append(ClassInfo(name, color))  # type: ignore[arg-type]
    if not classes:
        raise UserError(f"{where}: 'classes' is empty")
    input_size = raw.get("input_size")
    cfg = DatasetConfig(
        name=str(raw["name"]),
        classes=tuple(classes),
        normalization=_build(Normalization, raw.get("normalization"), f"{where}: normalization"),
        ignore_index=int(raw.get("ignore_index", 255)),
        input_size=tuple(input_size) if input_size else None,
        slide=_build(SlideSettings, raw.get("slide"), f"{where}: slide"),
        model=_build(ModelSettings, raw.get("model"), f"{where}: model"),
        data=_build(DataSettings, raw.get("data"), f"{where}: data"),
        train=_build(TrainSettings, raw.get("train"), f"{where}: train"),
    )
    if cfg.model.variant == "espnet" and len(classes) < 5:
        raise UserError(f"{where}: ESPNet's decoder needs at least 5 classes (its last ESP module spreads the "
                        f"classes over 5 dilated branches), this config has {len(classes)}: use "
                        "model.variant=espnet_c (the encoder network, any number of classes)")
    for name in ("encoder_epochs", "decoder_epochs"):
        if getattr(cfg.train, name) < 0:
            raise UserError(f"{where}: train.{name} must be 0 or more, got {getattr(cfg.train, name)}")
    return cfg


def load_config(name_or_path: str | Path) -> DatasetConfig:
    """Load ``configs/<name>.yaml`` by name (``"cityscapes"``) or any YAML file by path."""
    path = Path(name_or_path)
    if not path.suffix and not path.is_file():  # a name; a folder called "bcss" beside it (the data) is not a config
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise UserError(f"config {str(name_or_path)!r} not found (a YAML path, or one of: {known})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return config_from_dict(raw, where=str(path))


def with_overrides(cfg: DatasetConfig, overrides: list[str]) -> DatasetConfig:
    """Apply ``section.key=value`` overrides (values parsed as YAML), e.g. ``train.lr=1e-3``."""
    raw = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form section.key=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise UserError(f"override {item!r}: no section {part!r}")
            node = node[part]
        if parts[-1] not in node:
            raise UserError(f"override {item!r}: no key {parts[-1]!r}")
        node[parts[-1]] = yaml.safe_load(value)
    return config_from_dict(raw)
