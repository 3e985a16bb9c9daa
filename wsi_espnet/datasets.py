"""Training and evaluation data, read from the layouts people already have on disk.

Histology (``data.layout: slides`` or ``bcss``) goes through one path: a slide (or an RGB tile
treated as a one-level slide) and its labels (QuPath GeoJSON, a label image, a BCSS mask) are cut
into a Zarr patch store at the model's working resolution with :func:`wsi_espnet.patchstore.write_patch_store`,
the same store ``wsi-espnet tile`` writes, plus a ``labels`` array (N, tile, tile) uint8 and a
``class_pixels`` array (N, C) int64 of per-patch class counts.  Only patches with enough labelled
area are cut (the annotation coverage plays the tissue mask), so a 100k-pixel slide with three small
annotations costs three small reads, and training never touches the slide file again.

Street scenes (``cityscapes``, ``voc``, ``camvid``) are read image by image from their public layouts:

=============  =================================================================================
cityscapes     ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` and
               ``gtFine/{split}/{city}/*_gtFine_labelTrainIds.png`` (255 = ignored); when only
               the ``*_gtFine_labelIds.png`` of the download exist, the official id -> train id
               table is applied here.
voc            ``ImageSets/Segmentation/{split}.txt``, ``JPEGImages/{id}.jpg``,
               ``SegmentationClass/{id}.png`` (palette PNG: pixel value = class index, 255 =
               the ignored object border).
camvid         ``{split}/NAME.png`` and ``{split}annot/NAME.png`` (SegNet's CamVid, which the
               ESPNet authors used: class ids 0-10, 11 = void, the config's ignore id).
slides         ``{root}/{split}/NAME.svs`` (any slide format) with ``NAME.geojson`` (QuPath
               export; also ``NAME.svs.geojson`` / ``.json``) or a label image aligned to the
               slide, ``NAME.labels.png`` / ``.labels.tif`` / ``NAME-labels.png``.
bcss           ``{root}/images/NAME.png`` (or ``rgbs_colorNormalized/``) with
               ``{root}/masks/NAME.png`` as the BCSS download has them; code 0 = outside the
               annotated region (ignored); ``data.class_map`` maps the other codes to class names
               or ``ignore`` (unlisted codes are ignored too, with a warning); the split is ``{root}/{split}.txt`` (one name a
               line) or ``{root}/{split}/images|masks``; µm/px from the ``MPP-0.2500`` in BCSS
               file names, else ``data.mpp``.
=============  =================================================================================

The ignore value of a source (255) becomes the config's ``ignore_index`` on the way in.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .annotations import AnnotationMap, LabelImage, class_lookup, load_annotations
from .config import DatasetConfig
from .errors import UserError

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".qptiff", ".btf")
LABEL_IMAGE_SUFFIXES = (".labels.png", ".labels.tif", ".labels.tiff", "-labels.png", "-labels.tif", "-labels.tiff")
HISTOLOGY = ("slides", "bcss")
STORE_VERSION = 1
#: Coverage masks (which level-0 areas are labelled) are drawn with at most this many pixels a side.
COVERAGE_MAX_SIDE = 2048

# Cityscapes label id -> train id (cityscapesscripts/helpers/labels.py; 255 = not evaluated).
CITYSCAPES_ID_TO_TRAINID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                            25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_TRAIN_IDS = max(CITYSCAPES_ID_TO_TRAINID.values()) + 1  # 19 classes; 255 is ignored


# ------------------------------------------------------------------------------------------------
# Finding annotated slides.


@dataclass(frozen=True)
class LabelledSlide:
    """A slide (or an RGB tile read as a slide) and the file that labels it."""

    slide: Path
    labels: Path
    slide_mpp: float | None = None  # overrides the file's µm/px (plain images carry none)
    codes: tuple[tuple[int, int], ...] | None = None  # label-image code -> class id (BCSS)

    @property
    def is_geojson(self) -> bool:
        return self.labels.suffix.lower() in (".geojson", ".json")


def _sidecar(slide: Path) -> Path | None:
    stem = slide.name[: -len(".ome.tif")] if slide.name.lower().endswith(".ome.tif") else slide.stem
    candidates = [slide.with_name(stem + s) for s in (".geojson", ".json")]
    candidates += [slide.with_name(slide.name + s) for s in (".geojson", ".json")]
    candidates += [slide.with_name(stem + s) for s in LABEL_IMAGE_SUFFIXES]
    return next((c for c in candidates if c.is_file()), None)


def find_labelled_slides(root: str | Path, split: str) -> list[LabelledSlide]:
    """Slides under ``root/split`` that have annotations; slides without any are skipped with a
    warning, and none at all is a UserError (an empty dataset)."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise UserError(f"no folder {folder}: the slides layout is ROOT/{split}/NAME.svs with NAME.geojson next to it")
    slides = sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES and not p.name.lower().endswith(tuple(LABEL_IMAGE_SUFFIXES))
    )
    found, missing = [], []
    for s in slides:
        side = _sidecar(s)
        if side is None:
            missing.append(s.name)
        else:
            found.append(LabelledSlide(s, side))
    if missing:
        warnings.warn(f"{folder}: {len(missing)} slide(s) without annotations skipped: {', '.join(missing[:5])}", stacklevel=2)
    if not found:
        raise UserError(f"empty dataset: no slide in {folder} has a NAME.geojson (QuPath export) or NAME.labels.png next to it")
    return found


_MPP_IN_NAME = re.compile(r"MPP-(\d+(?:\.\d+)?)", re.IGNORECASE)


def bcss_code_table(cfg: DatasetConfig) -> tuple[tuple[int, int], ...]:
    """``data.class_map`` (code -> class name) as (code, class id) pairs; 0 is never a class."""
    if not cfg.data.class_map:
        raise UserError("the bcss layout needs data.class_map: {code: class name} (BCSS meta/gtruth_codes.tsv)")
    lookup = class_lookup(cfg.class_names, cfg.ignore_index)
    pairs, unknown = [], []
    for code, name in cfg.data.class_map.items():
        cid = lookup.get(str(name).strip().lower())
        if cid is None:
            unknown.append(str(name))
            continue
        try:
            number = int(code)
        except (TypeError, ValueError):
            raise UserError(f"data.class_map: code {code!r} is not a whole number (a mask's pixel value)") from None
        if not 0 < number < 256:
            raise UserError(f"data.class_map: code {code} must be 1-255 (0 is BCSS's 'outside the region')")
        pairs.append((number, cid))
    if unknown:
        raise UserError(f"data.class_map names unknown class(es) {', '.join(map(repr, unknown))}; the config's classes are {', '.join(map(repr, cfg.class_names))}")
    return tuple(sorted(pairs))


def find_bcss_tiles(root: str | Path, split: str, cfg: DatasetConfig) -> list[LabelledSlide]:
    """BCSS-style RGB tiles and masks of one split (see the module docstring)."""
    root = Path(root)
    codes = bcss_code_table(cfg)
    base = root / split if (root / split / "masks").is_dir() else root
    image_dir = next((base / d for d in ("images", "rgbs_colorNormalized", "rgbs") if (base / d).is_dir()), None)
    mask_dir = base / "masks"
    if image_dir is None or not mask_dir.is_dir():
        if base == root and not (root / split).is_dir() and not (root / f"{split}.txt").is_file():
            raise UserError(f"{root}: no split '{split}' (neither {root / split}/images|masks nor {root / split}.txt)")
        raise UserError(f"{base}: the bcss layout needs images/ (or rgbs_colorNormalized/) and masks/ folders")
    if base == root:
        listing = root / f"{split}.txt"
        if not listing.is_file():
            raise UserError(f"BCSS has no official split: list the tile names of '{split}' in {listing} (one a line), or use {root}/{split}/images|masks")
        names = [ln.strip() for ln in listing.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        names = [n if n.lower().endswith(".png") else n + ".png" for n in names]
    else:  # every tile of the split folder: an image without its mask is an error, not skipped
        names = sorted({p.name for p in mask_dir.glob("*.png")} | {p.name for p in image_dir.glob("*.png")})
    items, missing = [], []
    for name in names:
        img, mask = image_dir / name, mask_dir / name
        if not img.is_file() or not mask.is_file():
            missing.append(name)
            continue
        m = _MPP_IN_NAME.search(name)
        mpp = float(m.group(1)) if m else cfg.data.mpp
        if mpp is None:
            raise UserError(f"{img}: no 'MPP-x.xxxx' in the name; set data.mpp to the tiles' µm per pixel")
        items.append(LabelledSlide(img, mask, mpp, codes))
    if missing:
        raise UserError(f"{base}: {len(missing)} listed tile(s) lack an image or a mask, e.g. {missing[0]} "
                        f"(expected {image_dir.name}/{missing[0]} and {mask_dir.name}/{missing[0]}: BCSS tiles and "
                        "masks are .png files of the same name)")
    if not items:
        raise UserError(f"empty dataset: no BCSS tiles for split '{split}' under {base}")
    return items


def labelled_items(cfg: DatasetConfig, split: str, root: str | Path | None = None) -> list[LabelledSlide]:
    root = Path(root or cfg.data.root)
    if cfg.data.layout == "slides":
        return find_labelled_slides(root, split)
    if cfg.data.layout == "bcss":
        return find_bcss_tiles(root, split, cfg)
    raise UserError(f"layout {cfg.data.layout!r} is not a histology layout")


# ------------------------------------------------------------------------------------------------
# Labels of one slide.


def _background_id(cfg: DatasetConfig) -> int:
    value = str(cfg.data.unannotated).strip()
    if value.lower() == "ignore":
        return cfg.ignore_index
    lookup = class_lookup(cfg.class_names, cfg.ignore_index)
    if value.lower() not in lookup:
        raise UserError(f"data.unannotated must be 'ignore' or a class name, got {value!r}")
    return lookup[value.lower()]


def open_labels(item: LabelledSlide, cfg: DatasetConfig, slide) -> AnnotationMap | LabelImage:
    """The labels of ``item`` in the slide reader's level-0 frame."""
    size = tuple(slide.dimensions)
    if item.is_geojson:
        origin = (float(slide.bounds[0]), float(slide.bounds[1])) if getattr(slide, "bounds", None) else (0.0, 0.0)
        return load_annotations(
            item.labels, cfg.class_names, ignore_index=cfg.ignore_index, slide_size=size, origin=origin,
            unknown=cfg.data.unknown_classes, background=_background_id(cfg),
        )
    lut = None
    if item.codes is not None:
        lut = np.full(256, cfg.ignore_index, np.uint8)
        for code, cid in item.codes:
            lut[code] = cid
    labels = LabelImage(item.labels, size, cfg.ignore_index, cfg.num_classes, lut=lut,
                        listed=None if item.codes is None else {code for code, _ in item.codes})
    if item.codes is not None and labels.size != size:
        # A BCSS mask is its tile's pixel for pixel; another size is a wrong pairing or a resized
        # export, which resampling would silently shift against the image.
        raise UserError(f"{item.labels}: a BCSS mask must be its tile's size, {size[0]}x{size[1]}, "
                        f"got {labels.size[0]}x{labels.size[1]}")
    return labels


def coverage_mask(labels: AnnotationMap | LabelImage, level0_size: tuple[int, int], mpp: float | None):
    """Where the labels say something, as a TissueMask: the patch grid keeps tiles by it."""
    from .tissue import TissueMask

    w, h = level0_size
    ds = max(1.0, max(w, h) / COVERAGE_MAX_SIDE)
    mw, mh = max(1, math.ceil(w / ds)), max(1, math.ceil(h / ds))
    mask = np.zeros((mh, mw), bool)
    step = 1024
    for y in range(0, mh, step):
        for x in range(0, mw, step):
            mask[y : y + step, x : x + step] = labels.coverage(x, y, min(step, mw - x), min(step, mh - y), ds)
    return TissueMask(mask=mask, downsample=ds, mpp=None if mpp is None else mpp * ds, level0_size=(w, h))


# ------------------------------------------------------------------------------------------------
# Patch stores with labels.


def _compressor() -> Any:
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _store_recipe(item: LabelledSlide, cfg: DatasetConfig, tile: int, overlap: int, threshold: float) -> dict[str, Any]:
    """Everything that decides a store's content: a store is reused only when this matches."""
    return {
        "version": STORE_VERSION,
        "slide": str(item.slide.resolve()),
        "slide_bytes": item.slide.stat().st_size,
        "slide_mtime": int(item.slide.stat().st_mtime),
        "labels": str(item.labels.resolve()),
        "labels_sha256": _file_digest(item.labels),
        "codes": [list(c) for c in item.codes] if item.codes else None,
        "slide_mpp": item.slide_mpp,
        "classes": list(cfg.class_names),
        "ignore_index": cfg.ignore_index,
        "unannotated": cfg.data.unannotated,
        "unknown_classes": cfg.data.unknown_classes,
        "mpp": cfg.slide.mpp,
        "tile": tile,
        "overlap": overlap,
        "threshold": threshold,
    }


def add_labels(store: str | Path, labels: AnnotationMap | LabelImage, num_classes: int, ignore_index: int) -> None:
    """Add ``labels`` (N, t, t) uint8 and ``class_pixels`` (N, C) int64 to a patch store, drawn
    from ``labels`` at exactly the patches' windows (``xy`` at the store's ``mpp``)."""
    import zarr

    group = zarr.open_group(str(store), mode="r+")
    attrs = dict(group.attrs)
    t = int(attrs["tile"])
    ds = float(attrs["mpp"]) / float(attrs["source"]["level0_mpp"])
    width, height = attrs["grid"]["image_size"]
    xy = np.asarray(group["xy"][...]).reshape(-1, 2)
    n = len(xy)
    lab_arr = group.create_array(
        "labels", shape=(n, t, t), dtype="uint8", chunks=(1, t, t), compressors=_compressor(),
        fill_value=ignore_index, dimension_names=("patch", "y", "x"), overwrite=True,
    )
    counts = np.zeros((n, num_classes), np.int64)
    for i, (x, y) in enumerate(xy):
        lab = labels.labels_at_downsample(int(x), int(y), t, t, ds)
        # Beyond the image (the last tiles of a small slide are padded): nothing to learn there.
        if x + t > width:
            lab[:, max(0, width - x) :] = ignore_index
        if y + t > height:
            lab[max(0, height - y) :, :] = ignore_index
        lab_arr[i] = lab
        flat = lab[lab != ignore_index]
        if flat.size:
            counts[i] = np.bincount(flat, minlength=num_classes)[:num_classes]
    cp = group.create_array("class_pixels", shape=(n, num_classes), dtype="int64",
                            chunks=(max(1, min(n, 65536)), num_classes), fill_value=0, overwrite=True)
    if n:
        cp[...] = counts


def build_labelled_store(
    item: LabelledSlide,
    out: str | Path,
    cfg: DatasetConfig,
    *,
    tile: int,
    overlap: int,
    threshold: float,
    workers: int | None = None,
) -> Path:
    """Cut one labelled slide into a patch store with labels at ``cfg.slide.mpp``; kept tiles are
    those whose labelled share is at least ``threshold``.  Reused when it exists with the same
    recipe; written under a temporary name and renamed, so ``out`` is always complete."""
    import zarr

    from .patchstore import write_patch_store
    from .slide import open_slide

    out = Path(out)
    recipe = _store_recipe(item, cfg, tile, overlap, threshold)
    if out.is_dir():
        try:
            if zarr.open_group(str(out), mode="r").attrs.get("training") == recipe:
                return out
        except Exception:
            pass
    with open_slide(item.slide, mpp=item.slide_mpp) as slide:
        if slide.mpp is None:
            raise UserError(f"{item.slide}: the slide has no physical pixel size; training needs one")
        labels = open_labels(item, cfg, slide)
        mask = coverage_mask(labels, tuple(slide.dimensions), slide.mpp)
    building = out.with_name(out.name + ".building")
    if building.exists():
        shutil.rmtree(building)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no tile has tissue.*")
        write_patch_store(
            item.slide, building, mpp=cfg.slide.mpp, tile=tile, overlap=overlap, tissue_threshold=threshold,
            slide_mpp=item.slide_mpp, tissue_mask=mask, workers=workers, overwrite=True, progress=False,
        )
    add_labels(building, labels, cfg.num_classes, cfg.ignore_index)
    group = zarr.open_group(str(building), mode="r+")
    group.attrs["training"] = recipe
    group.attrs["class_names"] = list(cfg.class_names)
    group.attrs["ignore_index"] = cfg.ignore_index
    del group
    if out.exists():
        shutil.rmtree(out)
    building.rename(out)
    return out


def _store_name(item: LabelledSlide) -> str:
    digest = hashlib.sha1(str(item.slide.resolve()).encode()).hexdigest()[:8]
    return f"{item.slide.stem}-{digest}.zarr"


def build_split_stores(
    cfg: DatasetConfig,
    split: str,
    cache: str | Path,
    *,
    purpose: str,
    root: str | Path | None = None,
    workers: int | None = None,
) -> list[Path]:
    """One labelled patch store per slide of a split, under ``cache/split``.

    ``purpose="train"``: patches of ``train.crop`` with half overlap, kept when at least
    ``data.min_labelled`` of them is labelled.  ``purpose="eval"``: the inference grid
    (``slide.tile``, ``slide.overlap``), every tile with any labelled pixel, so evaluation sees the
    tiles ``wsi-segment`` would.
    """
    items = labelled_items(cfg, split, root)
    if purpose == "train":
        tile = int(cfg.train.crop[0])
        if int(cfg.train.crop[1]) != tile:
            raise UserError(f"train.crop must be square for histology, got {list(cfg.train.crop)}")
        overlap, threshold = tile // 2, float(cfg.data.min_labelled)
    elif purpose == "eval":
        tile, overlap, threshold = int(cfg.slide.tile), int(cfg.slide.overlap), 1e-6
    else:
        raise ValueError(purpose)
    folder = Path(cache) / f"{split}-{purpose}"
    stores = [
        build_labelled_store(it, folder / _store_name(it), cfg, tile=tile, overlap=overlap, threshold=threshold, workers=workers)
        for it in items
    ]
    return stores


# ------------------------------------------------------------------------------------------------
# Torch datasets.


def to_tensor(rgb: np.ndarray, label: np.ndarray, cfg: DatasetConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 HWC RGB + label -> normalised float32 CHW and int64 HW."""
    x = torch.from_numpy(np.ascontiguousarray(cfg.normalization.apply(rgb).transpose(2, 0, 1)))
    return x, torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))


class PatchDataset(Dataset):
    """Labelled patches from patch stores, with class-balanced sampling weights.

    ``augment(image, label, rng)`` runs per item with an RNG fixed by (seed, epoch, index), so a
    resumed run sees the same augmentations as an uninterrupted one.
    """

    def __init__(self, stores: Sequence[str | Path], cfg: DatasetConfig, augment: Callable | None = None, seed: int = 0) -> None:
        import zarr

        self.cfg, self.augment, self.seed, self.epoch = cfg, augment, seed, 0
        self.paths = [Path(s) for s in stores]
        self._groups: list[Any] | None = None
        index, pixels = [], []
        for si, path in enumerate(self.paths):
            g = zarr.open_group(str(path), mode="r")
            names = g.attrs.get("class_names")
            if names is not None and list(names) != list(cfg.class_names):
                raise UserError(f"{path}: made for classes {names}, the config has {list(cfg.class_names)}")
            cp = np.asarray(g["class_pixels"][...]).reshape(-1, cfg.num_classes)
            keep = np.flatnonzero(cp.sum(1) > 0)
            index.extend((si, int(j)) for j in keep)
            pixels.append(cp[keep])
        if not index:
            raise UserError("empty dataset: no patch with labelled pixels (check the annotations' class names and data.min_labelled)")
        self.index = np.asarray(index, np.int64)
        self.class_pixels = np.concatenate(pixels, 0)

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _group(self, si: int) -> Any:
        import zarr

        if self._groups is None:  # opened lazily: each DataLoader worker opens its own
            self._groups = [zarr.open_group(str(p), mode="r") for p in self.paths]
        return self._groups[si]

    def raw(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        si, j = self.index[k]
        g = self._group(int(si))
        return np.asarray(g["patches"][int(j)]), np.asarray(g["labels"][int(j)])

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rgb, lab = self.raw(k)
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, int(k)])
            rgb, lab = self.augment(rgb, lab, rng)
        return to_tensor(rgb, lab, self.cfg)

    def class_counts(self) -> np.ndarray:
        return self.class_pixels.sum(0)

    def sampling_weights(self) -> np.ndarray:
        """Per-patch weight ∑_c share_c(patch) / P_c, P_c the class's share of all labelled pixels:
        a patch is drawn as often as the rarity of what it shows warrants."""
        totals = self.class_pixels.sum(0).astype(np.float64)
        p = totals / totals.sum()
        inv = np.where(p > 0, 1.0 / np.where(p > 0, p, 1.0), 0.0)
        share = self.class_pixels / self.class_pixels.sum(1, keepdims=True)
        w = share @ inv
        return w / w.sum()

    def sampled_class_counts(self) -> np.ndarray:
        """Expected class pixels per epoch under :meth:`sampling_weights` (what the loss sees)."""
        return (self.sampling_weights()[:, None] * self.class_pixels).sum(0) * len(self)


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise UserError(f"{path}: not a readable image ({exc})") from None


def _read_index_png(path: Path) -> np.ndarray:
    """A label PNG as stored: palette indices for mode P (not the palette colours), values for L."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode in ("P", "L"):
                return np.asarray(im)
            if im.mode in ("I", "I;16"):
                return np.asarray(im).astype(np.int64)
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise UserError(f"{path}: not a readable label image ({exc})") from None


class ImageFolderDataset(Dataset):
    """Image / label-file pairs (Cityscapes, VOC): decoded per item, ``decode`` turns a label
    file into class ids with the config's ignore index."""

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        decode: Callable[[Path], np.ndarray],
        cfg: DatasetConfig,
        augment: Callable | None = None,
        base_size: tuple[int, int] | None = None,
        seed: int = 0,
    ) -> None:
        if not pairs:
            raise UserError("empty dataset: no image/label pairs found")
        self.pairs, self.decode, self.cfg = list(pairs), decode, cfg
        self.augment, self.base_size, self.seed, self.epoch = augment, base_size, seed, 0

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def raw(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        img_path, lab_path = self.pairs[k]
        rgb, lab = _read_rgb(img_path), self.decode(lab_path)
        if rgb.shape[:2] != lab.shape:
            raise UserError(f"{img_path} is {rgb.shape[1]}x{rgb.shape[0]} but its labels {lab_path} are {lab.shape[1]}x{lab.shape[0]}")
        return rgb, lab

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        from .augment import resize_image, resize_label

        rgb, lab = self.raw(k)
        if self.base_size is not None:
            w, h = self.base_size
            rgb, lab = resize_image(rgb, h, w), resize_label(lab, h, w)
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, int(k)])
            rgb, lab = self.augment(rgb, lab, rng)
        return to_tensor(rgb, lab, self.cfg)

    def class_counts(self) -> np.ndarray:
        """Class pixels over all labels (one pass over the label files)."""
        from .losses import count_labels

        return count_labels((self.decode(p) for _, p in self.pairs), self.cfg.num_classes, self.cfg.ignore_index)

    def sampling_weights(self) -> None:
        return None  # uniform


def _remap_ignore(lab: np.ndarray, source_ignore: int, ignore_index: int) -> np.ndarray:
    lab = lab.astype(np.uint8, copy=True)
    if source_ignore != ignore_index:
        lab[lab == source_ignore] = ignore_index
    return lab


def cityscapes_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """(image, label) pairs of a Cityscapes split; labels are ``*_labelTrainIds.png`` or, failing
    those, ``*_labelIds.png`` (converted by :func:`decode_cityscapes`)."""
    root = Path(root)
    img_dir = root / "leftImg8bit" / split
    if not img_dir.is_dir():
        raise UserError(f"no folder {img_dir}: the Cityscapes layout is ROOT/leftImg8bit/{split}/CITY/*_leftImg8bit.png")
    pairs, missing = [], []
    for img in sorted(img_dir.glob("*/*_leftImg8bit.png")):
        stem = img.name[: -len("_leftImg8bit.png")]
        gt = root / "gtFine" / split / img.parent.name
        lab = gt / f"{stem}_gtFine_labelTrainIds.png"
        if not lab.is_file():
            lab = gt / f"{stem}_gtFine_labelIds.png"
        if lab.is_file():
            pairs.append((img, lab))
        else:
            missing.append(img.name)
    if missing:
        raise UserError(f"{len(missing)} Cityscapes image(s) without gtFine labels, e.g. {missing[0]} (expected gtFine/{split}/CITY/*_gtFine_labelTrainIds.png)")
    if not pairs:
        raise UserError(f"empty dataset: no *_leftImg8bit.png under {img_dir}")
    return pairs


def decode_cityscapes(path: Path, ignore_index: int) -> np.ndarray:
    lab = _read_index_png(path)
    if lab.ndim != 2:
        raise UserError(f"{path}: a Cityscapes label file must be single-channel")
    if path.name.endswith("_labelIds.png"):
        lut = np.full(256, 255, np.uint8)
        for k, v in CITYSCAPES_ID_TO_TRAINID.items():
            lut[k] = v
        lab = lut[lab.astype(np.uint8)]
    bad = (lab != 255) & (lab >= CITYSCAPES_TRAIN_IDS)  # caught here, not as the loss's out-of-bounds error mid-training
    if bad.any():
        raise UserError(f"{path}: label value(s) {sorted(np.unique(lab[bad]).tolist())[:5]} are not Cityscapes "
                        f"train ids (0-{CITYSCAPES_TRAIN_IDS - 1}, 255 ignored)")
    return _remap_ignore(lab, 255, ignore_index)


def voc_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """(image, label) pairs listed in ``ImageSets/Segmentation/{split}.txt``."""
    root = Path(root)
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise UserError(f"no {listing}: the VOC layout is ROOT/ImageSets/Segmentation/{split}.txt, JPEGImages/, SegmentationClass/")
    ids = [ln.strip() for ln in listing.read_text().splitlines() if ln.strip()]
    pairs, missing = [], []
    for i in ids:
        img, lab = root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png"
        if img.is_file() and lab.is_file():
            pairs.append((img, lab))
        else:
            missing.append(i)
    if missing:
        raise UserError(f"{len(missing)} VOC id(s) in {listing.name} lack JPEGImages/ID.jpg or SegmentationClass/ID.png, e.g. {missing[0]}")
    return pairs


def decode_voc(path: Path, palette: np.ndarray, ignore_index: int) -> np.ndarray:
    """Palette PNG -> indices.  An RGB mask (someone re-saved it) is matched against the config's
    colours; VOC's border colour (224, 224, 192) and unknown colours are ignored."""
    lab = _read_index_png(path)
    if lab.ndim == 3:
        key = (lab[..., 0].astype(np.int64) << 16) | (lab[..., 1].astype(np.int64) << 8) | lab[..., 2]
        out = np.full(lab.shape[:2], 255, np.uint8)
        for i, (r, g, b) in enumerate(np.asarray(palette, np.int64)):
            out[key == ((r << 16) | (g << 8) | b)] = i
        lab = out
    lab = lab.astype(np.uint8)
    n = len(palette)
    bad = (lab != 255) & (lab >= n)
    if bad.any():
        raise UserError(f"{path}: label value(s) {sorted(np.unique(lab[bad]).tolist())[:5]} are not VOC class indices")
    return _remap_ignore(lab, 255, ignore_index)


def camvid_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """(image, label) pairs of a CamVid split in the SegNet layout the ESPNet authors trained from:
    ``ROOT/{split}/NAME.png`` with ``ROOT/{split}annot/NAME.png`` (class ids 0-10, 11 void)."""
    root = Path(root)
    img_dir, lab_dir = root / split, root / f"{split}annot"
    if not img_dir.is_dir() or not lab_dir.is_dir():
        raise UserError(f"no folders {img_dir} and {lab_dir}: the CamVid layout is ROOT/{split}/*.png with "
                        f"ROOT/{split}annot/*.png")
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() == ".png")
    missing = [p.name for p in images if not (lab_dir / p.name).is_file()]
    if missing:
        raise UserError(f"{len(missing)} CamVid image(s) without a label in {lab_dir}, e.g. {missing[0]}")
    if not images:
        raise UserError(f"empty dataset: no .png under {img_dir}")
    return [(p, lab_dir / p.name) for p in images]


def decode_index_png(path: Path, num_classes: int, ignore_index: int) -> np.ndarray:
    """A single-channel PNG of class ids; the config's ignore id (CamVid's void, 11) stays ignored."""
    lab = _read_index_png(path)
    if lab.ndim != 2:
        raise UserError(f"{path}: a label file must be single-channel class ids")
    lab = lab.astype(np.uint8)
    bad = (lab != ignore_index) & (lab >= num_classes)
    if bad.any():
        raise UserError(f"{path}: label value(s) {sorted(np.unique(lab[bad]).tolist())[:5]} are not class ids "
                        f"(0-{num_classes - 1})")
    return lab


def image_folder_dataset(cfg: DatasetConfig, split: str, augment: Callable | None = None, root: str | Path | None = None, seed: int = 0) -> ImageFolderDataset:
    root = Path(root or cfg.data.root)
    base = tuple(cfg.input_size) if (cfg.input_size and cfg.data.layout in ("cityscapes", "camvid")) else None
    if cfg.data.layout == "cityscapes":
        return ImageFolderDataset(cityscapes_pairs(root, split), lambda p: decode_cityscapes(p, cfg.ignore_index), cfg, augment, base, seed)  # type: ignore[arg-type]
    if cfg.data.layout == "voc":
        palette = cfg.palette
        return ImageFolderDataset(voc_pairs(root, split), lambda p: decode_voc(p, palette, cfg.ignore_index), cfg, augment, None, seed)
    if cfg.data.layout == "camvid":
        n = cfg.num_classes
        return ImageFolderDataset(camvid_pairs(root, split), lambda p: decode_index_png(p, n, cfg.ignore_index), cfg, augment, base, seed)  # type: ignore[arg-type]
    raise UserError(f"unknown data.layout {cfg.data.layout!r}: use slides, bcss, cityscapes, voc or camvid")


def training_dataset(cfg: DatasetConfig, cache: str | Path, split: str = "train", root: str | Path | None = None, workers: int | None = None) -> Dataset:
    """The augmented training set of ``cfg`` (patch stores built under ``cache`` for histology)."""
    from .augment import augmentation_for

    augment = augmentation_for(cfg.data.layout, tuple(cfg.train.crop), cfg.ignore_index)
    if cfg.data.layout in HISTOLOGY:
        stores = build_split_stores(cfg, split, cache, purpose="train", root=root, workers=workers)
        return PatchDataset(stores, cfg, augment, seed=cfg.train.seed)
    return image_folder_dataset(cfg, split, augment, root, seed=cfg.train.seed)


def write_class_counts(path: Path, counts: np.ndarray, class_names: Sequence[str]) -> None:
    path.write_text(json.dumps({n: int(c) for n, c in zip(class_names, counts)}, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# Demo data: synthetic slides with their truth as QuPath GeoJSON, in the slides layout.

#: What `make_demo_dataset` writes by default (the shipped tissue model's data).
DEMO_DEFAULTS = {"n_train": 6, "n_val": 2, "n_test": 2, "size": 4096, "mpp": 0.5, "truth_mpp": 1.0, "seed": 0}


class _LazyTruth:
    """The demo slide's class map at ``mpp`` as a read-only 2-D array: slices are rendered on
    demand, so the GeoJSON writer streams it block by block."""

    dtype = np.dtype(np.uint8)
    ndim = 2

    def __init__(self, spec, mpp: float) -> None:
        self.spec, self.mpp = spec, mpp
        w, h = spec.size_at_mpp(mpp)
        self.shape = (h, w)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        ys, xs = key
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        return self.spec.labels(x0, y0, x1 - x0, y1 - y0, self.mpp)


def demo_seeds(split: str, n: int, seed: int = 0) -> list[int]:
    """Content seeds of the demo slides of a split: train and val never share one."""
    base = {"train": 0, "val": 1000, "test": 2000}[split]
    return [seed * 10000 + base + i for i in range(n)]


def write_demo_pair(folder: Path, seed: int, size: int, mpp: float, truth_mpp: float, cfg: DatasetConfig | None = None) -> tuple[Path, Path]:
    """One demo slide (Aperio SVS) and its truth exported as QuPath GeoJSON (every class,
    Background included, pixel-exact polygons at ``truth_mpp``); existing files are kept."""
    from .demo import DemoSlideSpec, write_demo_slide
    from .geojson import write_geojson

    if cfg is None:
        from .config import load_config

        cfg = load_config("breast_biopsy")
    slide = folder / f"demo-{seed:05d}.svs"
    truth = folder / f"demo-{seed:05d}.geojson"
    if not slide.exists():
        write_demo_slide(slide, size, size, mpp=mpp, seed=seed, fmt="svs")
    if not truth.exists():
        spec = DemoSlideSpec(size, size, mpp, seed)
        write_geojson(truth, _LazyTruth(spec, truth_mpp), truth_mpp / mpp, class_names=cfg.class_names,
                      colors=[c.color for c in cfg.classes], mpp=truth_mpp, exclude=())
    return slide, truth


def make_demo_dataset(
    root: str | Path,
    *,
    n_train: int = DEMO_DEFAULTS["n_train"],
    n_val: int = DEMO_DEFAULTS["n_val"],
    n_test: int = DEMO_DEFAULTS["n_test"],
    size: int = DEMO_DEFAULTS["size"],
    mpp: float = DEMO_DEFAULTS["mpp"],
    truth_mpp: float = DEMO_DEFAULTS["truth_mpp"],
    seed: int = DEMO_DEFAULTS["seed"],
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write ``root/train``, ``root/val`` and ``root/test``: synthetic H&E slides (``size``² px at
    ``mpp``) with their truth as QuPath GeoJSON, so training goes through exactly the path of a
    user's annotated slides.  The three splits use disjoint seeds: ``val`` picks the best epoch,
    ``test`` is never seen by training at all.  Idempotent: a root made with the same parameters is
    left as it is; different parameters are a UserError."""
    root = Path(root)
    params = {"n_train": n_train, "n_val": n_val, "n_test": n_test, "size": size, "mpp": mpp, "truth_mpp": truth_mpp, "seed": seed}
    marker = root / "demo.json"
    if marker.is_file():
        old = json.loads(marker.read_text())
        if old != params:
            raise UserError(f"{root} holds demo data made with {old}; remove it or choose another data.root")
    elif root.exists() and any(root.iterdir()):
        raise UserError(f"{root} exists and is not a demo data folder (no demo.json); choose another data.root")
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        if n <= 0:
            continue
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for s in demo_seeds(split, n, seed):
            if log:
                log(f"demo data: {split} slide seed {s}")
            write_demo_pair(folder, s, size, mpp, truth_mpp)
    from .metrics import write_json

    write_json(str(marker), params)
    return root
