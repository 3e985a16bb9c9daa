"""Training augmentation, one recipe per imaging domain.

H&E tissue has no "up": a patch is as valid flipped or rotated by 90°, so all eight symmetries of the
square are used; its colour varies from lab to lab and scanner to scanner, mostly along the stain
axes, so the colour jitter works in haematoxylin-eosin-DAB optical density space (Tellez et al.,
2018: scale and shift each stain channel) rather than on RGB; and the working resolution is fixed by
the slide's micrometres per pixel, so scale jitter stays small (scanners differ by a few percent).

Street scenes have a horizon and a gravity direction: only horizontal flips, but large scale
changes (objects at every distance) and random crops, as in the ESPNet authors' training.

Every geometric step moves the label with the image, label by nearest neighbour (a class id is
never interpolated); pixels that a step invents (padding) are the ignore index, so they never teach
the model anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from skimage.color import hed2rgb, rgb2hed


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel for a nearest-neighbour resize (pixel centres aligned)."""
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def resize_label(label: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a label image: class ids are picked, never blended."""
    rows = nearest_indices(label.shape[0], height)
    cols = nearest_indices(label.shape[1], width)
    return label[rows[:, None], cols[None, :]]


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 RGB image (antialiased when shrinking, so a ×4 reduction averages
    the pixels it drops instead of aliasing them)."""
    if not (image.flags.writeable and image.flags.c_contiguous):  # torch wants writable, C-ordered memory
        image = np.array(image, order="C")
    t = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    shrink = height < image.shape[0] or width < image.shape[1]
    out = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False, antialias=shrink)
    return out[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def _resize_pair(image: np.ndarray, label: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    return resize_image(image, height, width), resize_label(label, height, width)


def _crop_or_pad(
    image: np.ndarray, label: np.ndarray, height: int, width: int, rng: np.random.Generator, ignore_index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random crop to (height, width); pads first where the input is smaller (image 0, label ignored)."""
    h, w = label.shape
    ph, pw = max(0, height - h), max(0, width - w)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=0)
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=ignore_index)
        h, w = label.shape
    y = int(rng.integers(0, h - height + 1))
    x = int(rng.integers(0, w - width + 1))
    return image[y : y + height, x : x + width], label[y : y + height, x : x + width]


def hed_jitter(image: np.ndarray, rng: np.random.Generator, scale: float = 0.05, shift: float = 0.01) -> np.ndarray:
    """Scale each stain channel (H, E, D) by U(1-scale, 1+scale) and shift it by U(-shift, shift)
    in optical-density space, then back to RGB uint8."""
    hed = rgb2hed(image)
    alpha = rng.uniform(1 - scale, 1 + scale, 3)
    beta = rng.uniform(-shift, shift, 3)
    rgb = hed2rgb(hed * alpha + beta)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def brightness_contrast(image: np.ndarray, rng: np.random.Generator, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """Mild photometric jitter around the image mean: what a different lamp or white balance does."""
    x = image.astype(np.float32)
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * rng.uniform(1 - saturation, 1 + saturation)
    mean = x.mean()
    x = mean + (x - mean) * rng.uniform(1 - contrast, 1 + contrast)
    x = x + 255.0 * rng.uniform(-brightness, brightness)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class HEAugment:
    """H&E patches: dihedral flips/rotations, small scale jitter, stain (HED) and photometric jitter.

    Output has the input's size: a scaled patch is cropped back, or padded by reflection (tissue
    texture continues plausibly, and the label is reflected with it).
    """

    scale: tuple[float, float] = (0.85, 1.18)
    hed_scale: float = 0.05
    hed_shift: float = 0.01
    brightness: float = 0.05
    contrast: float = 0.1
    saturation: float = 0.1
    ignore_index: int = 255

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w = label.shape
        s = float(np.exp(rng.uniform(np.log(self.scale[0]), np.log(self.scale[1]))))
        if abs(s - 1.0) > 0.02:
            nh, nw = max(1, round(h * s)), max(1, round(w * s))
            image, label = _resize_pair(image, label, nh, nw)
            if nh < h or nw < w:
                ph, pw = max(0, h - nh), max(0, w - nw)
                pad = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
                image = np.pad(image, (*pad, (0, 0)), mode="reflect")
                label = np.pad(label, pad, mode="reflect")
            image, label = _crop_or_pad(image, label, h, w, rng, self.ignore_index)
        k = int(rng.integers(0, 4))
        image, label = np.rot90(image, k, axes=(0, 1)), np.rot90(label, k, axes=(0, 1))
        if rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.hed_scale or self.hed_shift:
            image = hed_jitter(image, rng, self.hed_scale, self.hed_shift)
        if self.brightness or self.contrast or self.saturation:
            image = brightness_contrast(image, rng, self.brightness, self.contrast, self.saturation)
        return np.ascontiguousarray(image), np.ascontiguousarray(label)


@dataclass(frozen=True)
class StreetAugment:
    """Street scenes (Cityscapes, CamVid, VOC): random scale, random crop to ``crop`` (width,
    height), horizontal flip."""

    crop: tuple[int, int]
    scale: tuple[float, float] = (0.5, 2.0)
    ignore_index: int = 255

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        h, w = label.shape
        s = float(rng.uniform(*self.scale))
        if abs(s - 1.0) > 0.02:
            image, label = _resize_pair(image, label, max(1, round(h * s)), max(1, round(w * s)))
        image, label = _crop_or_pad(image, label, self.crop[1], self.crop[0], rng, self.ignore_index)
        if rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        return np.ascontiguousarray(image), np.ascontiguousarray(label)


HISTOLOGY_LAYOUTS = ("slides", "bcss")


def augmentation_for(layout: str, crop: tuple[int, int], ignore_index: int):
    """The recipe for a data layout: H&E for slides and tissue tiles, street for the rest."""
    if layout in HISTOLOGY_LAYOUTS:
        return HEAugment(ignore_index=ignore_index)
    return StreetAugment(crop=tuple(crop), ignore_index=ignore_index)  # type: ignore[arg-type]
