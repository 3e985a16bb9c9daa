"""Synthetic H&E demo slides with exact ground truth, at any size, in bounded memory.

Real slides with pixel-exact labels are rare and heavy; tests, benchmarks and a first training run need
one that is neither.  The demo slide is a *function*: :class:`DemoSlideSpec` maps (seed, physical
position) to a tissue class and a colour, so any region can be rendered at any resolution without
rendering anything else.  That is what lets a 100k x 100k Aperio SVS be written tile by tile (every
pyramid level is rendered from the function at its own resolution, never by holding level 0), and lets
other code ask for the truth of any region at any µm/px.

The layout lives in micrometres, not pixels, so morphology has the same physical size whatever the
scan resolution, as it does on glass:

* slowly varying fields (tissue extent, tumour zone, nest shape, fibre warp) are value noise sampled on a
  fixed physical grid (:data:`LAYOUT_STEP_UM`) and interpolated bilinearly; the grid is anchored at the
  slide origin, so neighbouring tiles and all pyramid levels see the same field;
* glands and blood pools are shapes placed one per cell of a jittered physical grid;
* cells (nuclei, red blood cells) are discs on a fine jittered grid whose size, density and colour
  depend on the class underneath.

Labels are point samples of the class field at pixel centres; colours are computed from those same
labels, so the truth is exactly consistent with the rendered pixels at that resolution.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import UserError
from .outputs import check_output

# Class ids of configs/breast_biopsy.yaml.
BACKGROUND, BENIGN, MALIGNANT, STROMA, DESMOPLASTIC, SECRETION, BLOOD, NECROSIS = range(8)
CLASS_NAMES = ("Background", "Benign epithelium", "Malignant epithelium", "Normal stroma",
               "Desmoplastic stroma", "Secretion", "Blood", "Necrosis")

#: Physical step of the layout grid; coarser reads use a coarser (nested) grid, see ``_layout_step``.
LAYOUT_STEP_UM = 4.0
GLAND_CELL_UM = 220.0
VESSEL_CELL_UM = 140.0
NUCLEUS_CELL_UM = 10.0

# Per-class appearance, indexed by class id: base colour, fibre colour amplitude, cell colour,
# cell radius (µm), radius spread, cell probability, per-pixel noise amplitude.
_BASE = np.array([
    [243, 243, 245],  # background: glass
    [198, 132, 200],  # benign epithelium: lilac cytoplasm
    [150, 80, 165],   # malignant: dark, dense
    [238, 158, 192],  # stroma: pink
    [222, 176, 212],  # desmoplastic stroma: pale, bluish pink
    [238, 212, 236],  # secretion: pale lavender
    [200, 40, 55],    # blood: red
    [208, 160, 178],  # necrosis: grey pink
], np.float32)
_FIBRE = np.array([[0, 0, 0], [0, 0, 0], [0, 0, 0], [-34, -48, -36], [-18, -22, -14],
                   [0, 0, 0], [0, 0, 0], [0, 0, 0]], np.float32)
_CELL_RGB = np.array([
    [243, 243, 245], [92, 48, 140], [62, 22, 104], [120, 60, 140], [110, 62, 150],
    [238, 212, 236], [225, 70, 80], [105, 62, 110],
], np.float32)
_CELL_DELTA = _CELL_RGB - _BASE
_CELL_R = np.array([0.0, 2.7, 3.4, 1.8, 2.0, 0.0, 3.3, 1.2], np.float32)
_CELL_SPREAD = np.array([0.0, 0.15, 0.35, 0.3, 0.3, 0.0, 0.05, 0.6], np.float32)
_CELL_P = np.array([0.0, 0.85, 0.97, 0.10, 0.22, 0.0, 1.0, 0.45], np.float32)
_NOISE = np.array([1.5, 6, 8, 5, 7, 3, 6, 14], np.float32)
_PEN_RGB = np.array([40, 105, 120], np.float32)


# --------------------------------------------------------------------------- hashing and noise
def _hash(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """Uniform [0, 1) from integer lattice coordinates: a fixed avalanche mix, identical anywhere."""
    with np.errstate(over="ignore"):
        h = (ix.astype(np.int64) * 0x27D4EB2D + iy.astype(np.int64) * 0x165667B1 + salt * 0x61C88647)
        h = (h & 0xFFFFFFFF).astype(np.uint32)
        h ^= h >> np.uint32(15)
        h *= np.uint32(0x2C1B3C6D)
        h ^= h >> np.uint32(12)
        h *= np.uint32(0x297A2D39)
        h ^= h >> np.uint32(15)
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(1.0 / (1 << 24))


def _value_noise(gx: np.ndarray, gy: np.ndarray, scale: float, salt: int) -> np.ndarray:
    """Smooth value noise in [0, 1] on the grid gx (columns) x gy (rows), positions in µm."""
    u, v = gx / scale, gy / scale
    iu, iv = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    fu, fv = (u - iu).astype(np.float32), (v - iv).astype(np.float32)
    fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
    # Hash only the lattice points next to a sample: a fine noise sampled on a coarse grid (a low
    # pyramid level) must not hash the whole lattice in between.
    ku, ru = np.unique(np.concatenate([iu, iu + 1]), return_inverse=True)
    kv, rv = np.unique(np.concatenate([iv, iv + 1]), return_inverse=True)
    lat = _hash(ku[None, :], kv[:, None], salt)
    n, m = len(iu), len(iv)
    cols = lat[:, ru[:n]] * (1 - fu) + lat[:, ru[n:]] * fu  # (lattice rows, len(gx))
    return cols[rv[:m]] * (1 - fv)[:, None] + cols[rv[m:]] * fv[:, None]


def _fbm(gx: np.ndarray, gy: np.ndarray, scale: float, octaves: int, salt: int) -> np.ndarray:
    total, amp, norm = 0.0, 1.0, 0.0
    for o in range(octaves):
        total = total + amp * _value_noise(gx, gy, scale / 2 ** o, salt + 101 * o)
        norm += amp
        amp *= 0.5
    return total / norm


def _layout_step(mpp: float) -> float:
    """LAYOUT_STEP_UM, doubled until at least one pixel: nested grids, bounded work at low resolution."""
    step = LAYOUT_STEP_UM
    while step < mpp:
        step *= 2
    return step


def _cell_params(cx: np.ndarray, cy: np.ndarray, salt: int, n: int) -> np.ndarray:
    """n uniform numbers per cell of a (rows, cols) cell grid: (rows, cols, n)."""
    return np.stack([_hash(cx[None, :], cy[:, None], salt + 7919 * k) for k in range(n)], axis=-1)


# --------------------------------------------------------------------------- the slide as a function
@dataclass(frozen=True)
class DemoSlideSpec:
    """A synthetic slide: ``width`` x ``height`` pixels at ``mpp`` µm/px, content fixed by ``seed``.

    Region arguments follow :meth:`wsi_espnet.slide.Slide.read_at_mpp`: (x, y, w, h) are pixels of the
    virtual image at ``mpp`` (default: the slide's own), so a region of the demo slide read at 1 µm/px
    and ``labels(x, y, w, h, 1.0)`` describe the same pixels.
    """

    width: int
    height: int
    mpp: float = 0.5
    seed: int = 0
    pen: bool = False
    empty: bool = False  # glass only: a slide with no tissue

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise UserError(f"demo slide size must be positive, got {self.width}x{self.height}")
        if not (math.isfinite(self.mpp) and self.mpp > 0):
            raise UserError(f"demo slide mpp must be positive, got {self.mpp}")

    # -- geometry
    @property
    def size_um(self) -> tuple[float, float]:
        return self.width * self.mpp, self.height * self.mpp

    def size_at_mpp(self, mpp: float) -> tuple[int, int]:
        """(width, height) of the virtual image at ``mpp``, rounded as :meth:`Slide.size_at_mpp`."""
        d = mpp / self.mpp
        return max(1, round(self.width / d)), max(1, round(self.height / d))

    @property
    def objective_power(self) -> float:
        return round(10.0 / self.mpp, 2)

    # -- content
    def labels(self, x: int, y: int, w: int, h: int, mpp: float | None = None) -> np.ndarray:
        """uint8 class ids (h, w) of a region of the virtual image at ``mpp``."""
        return self._classify(x, y, w, h, mpp or self.mpp)[0]

    def rgb(self, x: int, y: int, w: int, h: int, mpp: float | None = None) -> np.ndarray:
        """uint8 RGB (h, w, 3) of a region of the virtual image at ``mpp``."""
        return self.render(x, y, w, h, mpp)[0]

    def render(self, x: int, y: int, w: int, h: int, mpp: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(rgb, labels) of one region, computed together (the colours come from these labels)."""
        mpp = mpp or self.mpp
        labels, fields, px, py = self._classify(x, y, w, h, mpp)
        return self._paint(labels, fields, px, py, x, y, mpp), labels

    def _pixel_centres(self, x: int, y: int, w: int, h: int, mpp: float) -> tuple[np.ndarray, np.ndarray]:
        return (np.arange(x, x + w) + 0.5) * mpp, (np.arange(y, y + h) + 0.5) * mpp

    def _layout(self, px: np.ndarray, py: np.ndarray, mpp: float) -> np.ndarray:
        """Slow fields at the pixel centres (5, h, w): tissue, zone, nests, wobble, warp."""
        step = _layout_step(mpp)
        gx0, gx1 = int(math.floor(px[0] / step)), int(math.floor(px[-1] / step)) + 1
        gy0, gy1 = int(math.floor(py[0] / step)), int(math.floor(py[-1] / step)) + 1
        gx = np.arange(gx0, gx1 + 1) * step
        gy = np.arange(gy0, gy1 + 1) * step
        s = self.seed * 1000
        wum, hum = self.size_um
        side = min(wum, hum)
        tissue_scale = min(max(side / 2.5, 150.0), 3000.0)
        tissue = _fbm(gx, gy, tissue_scale, 3, s + 1)
        # Fade tissue out towards the slide edges: glass all round, as on a real slide.
        margin = 0.1 * side
        ex = np.clip(np.minimum(gx, wum - gx) / margin, 0, 1).astype(np.float32)
        ey = np.clip(np.minimum(gy, hum - gy) / margin, 0, 1).astype(np.float32)
        tissue = tissue - 0.45 * (1 - ey[:, None] * ex[None, :])
        grid = np.stack([
            tissue,
            _fbm(gx, gy, 320.0, 2, s + 2),  # tumour zone
            _fbm(gx, gy, 55.0, 2, s + 3),   # nest shapes
            _value_noise(gx, gy, 14.0, s + 4),  # gland outline wobble
            _fbm(gx, gy, 40.0, 2, s + 5),   # fibre warp
        ])  # (5, rows, cols)
        # Bilinear interpolation to the pixel centres, separable, from absolute grid positions
        # (np.take: several times faster than fancy indexing here).
        u = px / step - gx0
        v = py / step - gy0
        iu, iv = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
        fu, fv = (u - iu).astype(np.float32), (v - iv).astype(np.float32)[:, None]
        left = np.take(grid, iu, axis=2)
        cols = np.take(grid, iu + 1, axis=2)
        cols -= left
        cols *= fu
        cols += left
        out = np.take(cols, iv, axis=1)
        lower = np.take(cols, iv + 1, axis=1)
        lower -= out
        lower *= fv
        out += lower
        return out

    def _classify(self, x: int, y: int, w: int, h: int, mpp: float):
        if w < 1 or h < 1:
            raise UserError(f"region size must be positive, got {w}x{h}")
        px, py = self._pixel_centres(x, y, w, h, mpp)
        f = self._layout(px, py, mpp)
        tissue, zone, nest = f[0], f[1], f[2]
        labels = np.full((h, w), STROMA, np.uint8)
        labels[zone > 0.53] = DESMOPLASTIC
        malignant = (zone > 0.56) & (nest > 0.5)
        labels[malignant] = MALIGNANT
        labels[malignant & (nest > 0.68) & (zone > 0.6)] = NECROSIS
        self._glands(labels, px, py, mpp, f[3], zone)
        self._vessels(labels, px, py, mpp, f[3])
        in_tissue = tissue > 0.3
        if self.empty:
            in_tissue[:] = False
        if self.pen:
            in_tissue &= ~self._pen_mask(px, py)
        labels[~in_tissue] = BACKGROUND
        return labels, f, px, py

    def _shapes(self, px: np.ndarray, py: np.ndarray, mpp: float, cell: float, rmax: float, salt: int):
        """Shapes placed one per cell at most (glands, vessels), centred at a random point of the cell
        with room for ``rmax`` all round, so only a pixel's own cell can cover it.

        Yields (params, block, dx, dy): the cell's 6 uniform numbers, the pixel block near the shape,
        and pixel positions relative to the shape centre.  At fine resolution each cell near the
        region gets its own small block (cost only where shapes are); where a cell is under 64 pixels
        wide (low pyramid levels) one block covers the region with per-pixel parameters, instead of a
        Python loop over thousands of cells.  The choice depends on ``mpp`` only, so a given resolution
        always gives the same labels.
        """
        span = cell - 2 * rmax
        if cell < 64 * mpp:
            cx, cy = np.floor(px / cell).astype(np.int64), np.floor(py / cell).astype(np.int64)
            params = _cell_params(cx, cy, salt, 6)  # (h, w, 6), one cell per pixel
            centre_x = cx[None, :] * cell + rmax + params[..., 1].astype(np.float64) * span
            centre_y = cy[:, None] * cell + rmax + params[..., 2].astype(np.float64) * span
            dx = (px[None, :] - centre_x).astype(np.float32)
            dy = (py[:, None] - centre_y).astype(np.float32)
            yield params, (slice(None), slice(None)), dx, dy
            return
        cxs = np.arange(math.floor(px[0] / cell), math.floor(px[-1] / cell) + 1)
        cys = np.arange(math.floor(py[0] / cell), math.floor(py[-1] / cell) + 1)
        params = _cell_params(cxs, cys, salt, 6)
        for j, cy in enumerate(cys):
            for i, cx in enumerate(cxs):
                p = params[j, i]
                centre_x = cx * cell + rmax + float(p[1]) * span
                centre_y = cy * cell + rmax + float(p[2]) * span
                x0, x1 = np.searchsorted(px, [centre_x - rmax, centre_x + rmax])
                y0, y1 = np.searchsorted(py, [centre_y - rmax, centre_y + rmax])
                if x1 > x0 and y1 > y0:
                    dx = (px[x0:x1] - centre_x).astype(np.float32)[None, :]
                    dy = (py[y0:y1] - centre_y).astype(np.float32)[:, None]
                    yield p, (slice(y0, y1), slice(x0, x1)), dx, dy

    def _glands(self, labels: np.ndarray, px: np.ndarray, py: np.ndarray, mpp: float,
                wobble: np.ndarray, zone: np.ndarray) -> None:
        """Benign glands: an epithelial ring around a lumen of secretion, one per cell at most, away
        from the tumour zone."""
        for p, block, dx, dy in self._shapes(px, py, mpp, GLAND_CELL_UM, 57.0, self.seed * 1000 + 11):
            present, size, ecc, ang = p[..., 0], p[..., 3], p[..., 4], p[..., 5]
            if np.all(present >= 0.7):
                continue
            a = 30.0 + 20.0 * size
            b = a * (0.65 + 0.35 * ecc)
            ct, st = np.cos(ang * np.float32(math.pi)), np.sin(ang * np.float32(math.pi))
            u, v = (dx * ct + dy * st) / a, (dy * ct - dx * st) / b
            rho = np.sqrt(u * u + v * v) * (1.0 + 0.22 * (wobble[block] - 0.5))
            gland = (rho < 1.0) & (zone[block] < 0.5) & (present < 0.7)
            sub = labels[block]
            sub[gland] = BENIGN
            sub[gland & (rho < 0.58)] = SECRETION

    def _vessels(self, labels: np.ndarray, px: np.ndarray, py: np.ndarray, mpp: float, wobble: np.ndarray) -> None:
        """Blood: small irregular pools in stroma (a vessel cut across, or haemorrhage)."""
        for p, block, dx, dy in self._shapes(px, py, mpp, VESSEL_CELL_UM, 28.0, self.seed * 1000 + 13):
            present = p[..., 0]
            if np.all(present >= 0.3):
                continue
            radius = 9.0 + 14.0 * p[..., 3]
            rho = np.sqrt(dx * dx + dy * dy) / radius * (1.0 + 0.35 * (wobble[block] - 0.5))
            sub = labels[block]
            sub[(rho < 1.0) & (present < 0.3) & ((sub == STROMA) | (sub == DESMOPLASTIC))] = BLOOD

    def _pen_mask(self, px: np.ndarray, py: np.ndarray) -> np.ndarray:
        """A marker stroke across the upper part of the slide (pathologists circle regions)."""
        wum, hum = self.size_um
        centre = hum * 0.18 + 0.06 * hum * np.sin(px / wum * 2 * math.pi * 1.3 + self.seed)
        return np.abs(py[:, None] - centre[None, :]) < max(0.012 * min(wum, hum), 25.0)

    def _paint(self, labels: np.ndarray, f: np.ndarray, px: np.ndarray, py: np.ndarray,
               x: int, y: int, mpp: float) -> np.ndarray:
        h, w = labels.shape
        base = np.take(_BASE, labels, axis=0)
        # Fibres: wavy bands about 6 µm apart, warped by a slow field; averaged away below ~2 µm/px.
        fibre_gain = float(np.clip(1.5 - mpp / 2.0, 0.0, 1.0))
        if fibre_gain > 0:
            phase_x = ((px * 0.8 / 6.0) % 1.0).astype(np.float32)
            phase_y = ((py * 0.6 / 6.0) % 1.0).astype(np.float32)
            phase = phase_x[None, :] + phase_y[:, None]
            phase += np.float32(7.0) * f[4]
            weight = np.sin(np.float32(2 * math.pi) * phase)
            weight *= np.float32(0.5 * fibre_gain)
            weight += np.float32(0.5)
            base += np.take(_FIBRE, labels, axis=0) * weight[..., None]
        else:
            base += np.take(_FIBRE, labels, axis=0) * np.float32(0.5)
        base += self._cells(labels, px, py, mpp)
        # Grain: per-pixel noise from a periodic table (cheap), weaker at low resolution.
        grain = _grain_table(self.seed)
        n = grain.shape[0]
        g = grain[np.arange(y, y + h) % n][:, np.arange(x, x + w) % n]
        amp = np.take(_NOISE, labels) * np.float32(min(1.0, math.sqrt(0.5 / mpp)))
        base += (g * amp)[..., None]
        if self.pen:
            ink = self._pen_mask(px, py)
            base[ink] = base[ink] * 0.15 + _PEN_RGB * 0.85
        base += np.float32(0.5)
        np.clip(base, 0, 255, out=base)
        return base.astype(np.uint8)

    def _cells(self, labels: np.ndarray, px: np.ndarray, py: np.ndarray, mpp: float) -> np.ndarray:
        """Colour offset from nuclei / red cells: discs on a jittered grid, per-class size and density.

        Below the resolution that resolves a disc, its expected coverage is blended in instead, so a
        low pyramid level has the average colour of the level above it rather than aliasing.
        """
        c = NUCLEUS_CELL_UM
        rmax = 3.0
        resolved = float(np.clip(2.0 - mpp / 1.5, 0.0, 1.0))
        mean_cover = _CELL_P * np.float32(math.pi) * _CELL_R ** 2 / np.float32(c * c)
        if resolved == 0.0:
            cover = np.take(mean_cover, labels)
        else:
            cx, cy = np.floor(px / c).astype(np.int64), np.floor(py / c).astype(np.int64)
            ux, nx = np.unique(cx, return_counts=True)
            uy, ny = np.unique(cy, return_counts=True)
            params = _cell_params(ux, uy, self.seed * 1000 + 17, 4)
            # Expand cell parameters to pixels by run lengths (cells are contiguous runs of pixels).
            expand = lambda a: np.repeat(np.repeat(a, ny, axis=0), nx, axis=1)  # noqa: E731
            ox = ((px - cx * c) - rmax).astype(np.float32)  # position in the cell, per column
            oy = ((py - cy * c) - rmax).astype(np.float32)
            span = np.float32(c - 2 * rmax)
            dx = ox[None, :] - expand(params[..., 1] * span)
            dy = oy[:, None] - expand(params[..., 2] * span)
            d = np.sqrt(dx * dx + dy * dy)
            r = np.take(_CELL_R, labels) * (1.0 + np.take(_CELL_SPREAD, labels) * (expand(params[..., 3]) - 0.5))
            cover = np.clip((r - d) * np.float32(1.0 / max(mpp, 0.5)) + 0.5, 0.0, 1.0)
            cover *= expand(params[..., 0]) < np.take(_CELL_P, labels)
            if resolved < 1.0:
                cover = resolved * cover + (1 - resolved) * np.take(mean_cover, labels)
        return np.take(_CELL_DELTA, labels, axis=0) * cover[..., None]


_GRAIN: dict[int, np.ndarray] = {}


def _grain_table(seed: int, n: int = 512) -> np.ndarray:
    """A 512 x 512 table of uniform noise in [-1, 1), tiled over the slide: per-pixel grain without
    hashing every pixel.  The period is invisible under the rest of the texture."""
    table = _GRAIN.get(seed)
    if table is None:
        table = np.random.default_rng([seed, 0x5EED]).random((n, n), dtype=np.float32) * 2 - 1
        _GRAIN[seed] = table
    return table


# --------------------------------------------------------------------------- writing
def _pyramid(width: int, height: int, tile: int) -> list[tuple[int, int]]:
    """Level sizes, halving (ceil) until the level fits in one tile."""
    dims = [(width, height)]
    while max(dims[-1]) > tile:
        w, h = dims[-1]
        dims.append((-(-w // 2), -(-h // 2)))
    return dims


def _tiles(spec: DemoSlideSpec, dims: tuple[int, int], mpp: float, tile: int, workers: int) -> Iterator[np.ndarray]:
    """Tiles of one level in row-major order, rendered ahead by a small thread pool (numpy releases
    the GIL), at most ``4 * workers`` tiles in memory."""
    w, h = dims
    coords = [(tx, ty) for ty in range(0, h, tile) for tx in range(0, w, tile)]
    render = lambda c: spec.rgb(c[0], c[1], tile, tile, mpp)  # noqa: E731
    if workers <= 1:
        for c in coords:
            yield render(c)
        return
    window = 4 * workers
    with ThreadPoolExecutor(workers) as pool:
        pending = [pool.submit(render, c) for c in coords[:window]]
        for i in range(len(coords)):
            result = pending[i].result()
            pending[i] = None  # type: ignore[call-overload]
            if i + window < len(coords):
                pending.append(pool.submit(render, coords[i + window]))
            yield result


def _aperio_description(spec: DemoSlideSpec, dims: tuple[int, int], tile: int, quality: int, level0: bool) -> str:
    w0, h0 = spec.width, spec.height
    head = f"Aperio Image Library v12.0.15 \r\n{w0}x{h0} [0,0 {w0}x{h0}] ({tile}x{tile})"
    if not level0:
        head += f" -> {dims[0]}x{dims[1]}"
    head += f" JPEG/RGB Q={quality}"
    if not level0:
        return head
    fields = {
        "AppMag": f"{spec.objective_power:g}",
        "MPP": f"{spec.mpp:g}",
        "Filename": "wsi-espnet-demo",
        "Title": f"wsi-espnet synthetic H&E demo slide, seed {spec.seed}",
        "ScanScope ID": "SYNTHETIC",
    }
    return head + "|" + "|".join(f"{k} = {v}" for k, v in fields.items())


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_demo_slide(path: str | Path, width: int, height: int, mpp: float = 0.5, seed: int = 0,
                     fmt: str = "svs", tile: int = 256, quality: int = 90, pen: bool = False,
                     overwrite: bool = False, workers: int | None = None, empty: bool = False,
                     bigtiff: bool | None = None) -> Path:
    """Write the demo slide as an Aperio SVS (``fmt="svs"``) or a pyramidal OME-TIFF (``"ome"``).

    Tiled JPEG, 2x pyramid down to one tile; the SVS has Aperio's layout (level 0, a stripped
    thumbnail, then the levels as further IFDs) and description, so OpenSlide reports vendor aperio,
    the mpp and the objective power.  The OME-TIFF keeps levels in SubIFDs with PhysicalSizeX/Y.
    Written to a temporary name and renamed: never a half-written file at ``path``.
    """
    import tifffile

    path = Path(path)
    if fmt not in ("svs", "ome"):
        raise UserError(f"demo slide format must be 'svs' or 'ome', got {fmt!r}")
    if tile % 16 or tile < 16:
        raise UserError(f"tile size must be a positive multiple of 16, got {tile}")
    if not 1 <= quality <= 100:
        raise UserError(f"JPEG quality must be 1..100, got {quality}")
    check_output(path, overwrite)
    spec = DemoSlideSpec(width, height, mpp, seed, pen, empty)
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    dims = _pyramid(width, height, tile)
    # tifffile encodes tiles in parallel batches of `buffersize` bytes (512 MB by default): keep a
    # batch to a few tiles per worker so memory stays flat with slide size.
    jpeg = dict(compression="jpeg", compressionargs={"level": quality}, photometric="rgb",
                maxworkers=workers, buffersize=4 * workers * tile * tile * 3)
    resolution = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    # BigTIFF when the raw pixels (with pyramid) pass 2 GiB: JPEG keeps most files far smaller, but a
    # classic TIFF that overflows 4 GiB cannot be fixed afterwards.
    big = width * height * 3 * 4 // 3 > 2**31 if bigtiff is None else bigtiff
    tmp = _temp_path(path)
    try:
        if fmt == "svs":
            with tifffile.TiffWriter(tmp, bigtiff=big) as tw:
                for level, d in enumerate(dims):
                    tw.write(_tiles(spec, d, mpp * 2 ** level, tile, workers), shape=(d[1], d[0], 3), dtype=np.uint8,
                             tile=(tile, tile), description=_aperio_description(spec, d, tile, quality, level == 0),
                             metadata=None, **jpeg, **(resolution if level == 0 else {}))
                    if level == 0:  # the thumbnail is the second IFD, stripped, as Aperio writes it
                        scale = max(width, height) / 1024
                        tdims = spec.size_at_mpp(mpp * max(scale, 1.0))
                        thumb = np.empty((tdims[1], tdims[0], 3), np.uint8)
                        for ty in range(0, tdims[1], tile):  # tile by tile: bounded memory
                            for tx in range(0, tdims[0], tile):
                                tw_, th_ = min(tile, tdims[0] - tx), min(tile, tdims[1] - ty)
                                thumb[ty:ty + th_, tx:tx + tw_] = spec.rgb(tx, ty, tw_, th_, mpp * max(scale, 1.0))
                        tw.write(thumb, description=_aperio_description(spec, tdims, tile, quality, False),
                                 metadata=None, rowsperstrip=16, **jpeg)
        else:
            with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:
                for level, d in enumerate(dims):
                    meta = dict(axes="YXS", PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp,
                                PhysicalSizeYUnit="µm", Name=f"wsi-espnet demo slide seed {seed}",
                                Channel={"Name": ["RGB"]}) if level == 0 else None
                    tw.write(_tiles(spec, d, mpp * 2 ** level, tile, workers), shape=(d[1], d[0], 3),
                             dtype=np.uint8, tile=(tile, tile), subifds=len(dims) - 1 if level == 0 else None,
                             subfiletype=1 if level else 0, metadata=meta, **jpeg,
                             resolution=(1e4 / (mpp * 2 ** level),) * 2, resolutionunit="CENTIMETER")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def default_truth_mpp(spec: DemoSlideSpec, max_side: int = 8192) -> float:
    """The slide's mpp doubled until the truth image's longest side is at most ``max_side``."""
    m = spec.mpp
    while max(spec.size_at_mpp(m)) > max_side:
        m *= 2
    return m


def demo_truth(width: int, height: int, seed: int = 0, mpp: float = 0.5, x0: int = 0, y0: int = 0,
               out_w: int | None = None, out_h: int | None = None, out_mpp: float | None = None,
               pen: bool = False) -> np.ndarray:
    """Class ids of a region of the demo slide (width x height at ``mpp``, ``seed``), at ``out_mpp``.

    (x0, y0, out_w, out_h) are pixels at ``out_mpp`` (default ``mpp``); the default size is the whole
    slide at that resolution.
    """
    spec = DemoSlideSpec(width, height, mpp, seed, pen)
    out_mpp = out_mpp or mpp
    fw, fh = spec.size_at_mpp(out_mpp)
    return spec.labels(x0, y0, out_w or fw - x0, out_h or fh - y0, out_mpp)


def _truth_description(mpp: float) -> str:
    ids = ", ".join(f"{i}={name}" for i, name in enumerate(CLASS_NAMES))
    return f"wsi-espnet demo truth: class ids {ids}; mpp={mpp:g}"


def write_truth(path: str | Path, spec: DemoSlideSpec, mpp: float | None = None, overwrite: bool = False,
                tile: int = 512) -> Path:
    """Write the class-id map at ``mpp`` (default :func:`default_truth_mpp`) as PNG or tiled TIFF.

    PNG: 8-bit greyscale, pixel value = class id (so every reader gets ids, not palette colours).
    TIFF: tiled, palette-coloured with the breast_biopsy colours so viewers show it, resolution tags
    set; written tile by tile, so any size works.
    """
    import imagecodecs
    import tifffile

    path = Path(path)
    check_output(path, overwrite)
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise UserError(f"truth resolution must be a positive µm per pixel, got {mpp}")
    mpp = mpp or default_truth_mpp(spec)
    w, h = spec.size_at_mpp(mpp)
    tmp = _temp_path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".png":
            labels = np.vstack([spec.labels(0, y, w, min(tile, h - y), mpp) for y in range(0, h, tile)])
            tmp.write_bytes(imagecodecs.png_encode(labels))
        elif suffix in (".tif", ".tiff"):
            from .config import load_config

            colors = np.zeros((3, 256), np.uint16)
            for i, cls in enumerate(load_config("breast_biopsy").classes):
                colors[:, i] = np.asarray(cls.color, np.uint16) * 257
            tiles = (spec.labels(tx, ty, tile, tile, mpp) for ty in range(0, h, tile) for tx in range(0, w, tile))
            with tifffile.TiffWriter(tmp, bigtiff=w * h > 2**31) as tw:
                tw.write(tiles, shape=(h, w), dtype=np.uint8, tile=(tile, tile), photometric="palette",
                         colormap=colors, compression="zlib", metadata=None, maxworkers=1,
                         resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER",
                         description=_truth_description(mpp))
        else:
            raise UserError(f"truth must be .png or .tif, got {path.name}")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# --------------------------------------------------------------------------- CLI
def _parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX*]\s*(\d+)\s*)?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"size must be W or WxH (e.g. 20000 or 20000x15000), got {text!r}")
    w = int(m.group(1))
    h = int(m.group(2) or w)
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError("size must be positive")
    return w, h


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output slide, .svs (Aperio) or .ome.tif")
    parser.add_argument("--size", type=_parse_size, default=(4096, 4096),
                        help="W or WxH in pixels at level 0 (default 4096)")
    parser.add_argument("--mpp", type=float, default=0.5, help="µm per pixel at level 0 (default 0.5, a 20x scan)")
    parser.add_argument("--seed", type=int, default=0, help="content seed (default 0)")
    parser.add_argument("--ome", type=Path, help="also write the same content as pyramidal OME-TIFF here")
    parser.add_argument("--truth", type=Path, help="also write the class-id map (.png or .tif)")
    parser.add_argument("--truth-mpp", type=float,
                        help="µm/px of the truth map (default: the slide's mpp, doubled until the map fits 8192 px)")
    parser.add_argument("--tile", type=int, default=256, help="tile size (default 256)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    parser.add_argument("--pen", action="store_true", help="draw a marker-pen stroke (labelled Background)")
    parser.add_argument("--empty", action="store_true", help="glass only, no tissue (for testing empty results)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def run(args: argparse.Namespace) -> int:
    import time

    w, h = args.size
    outputs = [args.out] + [p for p in (args.ome, args.truth) if p is not None]
    for p in outputs:  # check all before writing any: no partial set of outputs
        check_output(p, args.overwrite)
    if len({os.path.abspath(p) for p in outputs}) < len(outputs):
        raise UserError("the slide, --ome and --truth must be three different files")
    if args.truth is not None and args.truth.suffix.lower() not in (".png", ".tif", ".tiff"):
        raise UserError(f"truth must be .png or .tif, got {args.truth.name}")
    if args.truth_mpp is not None and not (math.isfinite(args.truth_mpp) and args.truth_mpp > 0):
        raise UserError(f"--truth-mpp must be a positive µm per pixel, got {args.truth_mpp}")
    name = args.out.name.lower()
    fmt = "ome" if name.endswith((".ome.tif", ".ome.tiff")) else "svs"
    if fmt == "svs" and not name.endswith((".svs", ".tif", ".tiff")):
        raise UserError(f"output must end in .svs or .ome.tif, got {args.out.name}")
    t0 = time.perf_counter()
    write_demo_slide(args.out, w, h, args.mpp, args.seed, fmt=fmt, tile=args.tile, quality=args.quality,
                     pen=args.pen, overwrite=args.overwrite, empty=args.empty)
    mb, seconds = args.out.stat().st_size / 1e6, time.perf_counter() - t0
    print(f"wrote {args.out} ({w}x{h} at {args.mpp:g} µm/px, {mb:.1f} MB, {seconds:.1f} s)")
    if args.ome is not None:
        write_demo_slide(args.ome, w, h, args.mpp, args.seed, fmt="ome", tile=args.tile, quality=args.quality,
                         pen=args.pen, overwrite=args.overwrite, empty=args.empty)
        print(f"wrote {args.ome}")
    if args.truth is not None:
        spec = DemoSlideSpec(w, h, args.mpp, args.seed, args.pen, args.empty)
        write_truth(args.truth, spec, args.truth_mpp, overwrite=args.overwrite)
        print(f"wrote {args.truth} (class ids at {args.truth_mpp or default_truth_mpp(spec):g} µm/px)")
    return 0
