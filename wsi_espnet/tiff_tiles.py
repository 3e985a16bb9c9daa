"""Region reads from a tiled TIFF page by decoding its tiles directly, keeping decoded tiles.

Why: OpenSlide composites every region through cairo.  A 512² read from an Aperio level costs
~4 ms of CPU even when every tile it needs is in OpenSlide's cache (~6 ms otherwise), while decoding
the JPEG tiles with imagecodecs (libjpeg-turbo, as OpenSlide) and copying them costs ~0.3 ms per
256² tile.  On a CPU the reader threads take that time from the model, so reading was the largest
cost of whole-slide segmentation besides the network.  Neighbouring grid tiles overlap, so most JPEG
tiles are needed by two or three reads: decoded tiles are kept in a small LRU cache
(:class:`TileCache`, bounded in bytes, so memory does not grow with the slide).

Only pages this module can read exactly are taken (:func:`page_reader`: tiled, 8-bit RGB or YCbCr,
one plane, a compression imagecodecs decodes), and the slide checks each level against its backend's
own pixels before its first use (:func:`agrees`): a level that differs in any byte stays on the backend.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import numpy as np

#: Compressions read here: none, LZW, JPEG, Adobe/zlib deflate, Aperio JPEG 2000 (YCbCr and RGB).
COMPRESSIONS = frozenset({1, 5, 7, 8, 32946, 33003, 33005})

#: Decoded tiles kept per slide (OpenSlide's default cache size).  A 512² read spans 3 x 3 tiles of
#: 256², and neighbouring reads share a row or column of them: ~170 tiles of 256² RGB are the reads
#: of a whole tile row on a level up to ~15k px wide, and the neighbours' on any level.  64 MB bought
#: no speed (tiling a 100k² slide: 183 patches/s either way) for 55 MB more peak memory.
CACHE_BYTES = 32 << 20


class TileCache:
    """Thread-safe LRU of decoded tiles, bounded in bytes.  Two threads that miss the same tile at
    once both decode it (same result); locking around the decode would serialise the readers."""

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._tiles: OrderedDict[Any, np.ndarray | None] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Any) -> tuple[bool, np.ndarray | None]:
        with self._lock:
            if key not in self._tiles:
                return False, None
            self._tiles.move_to_end(key)
            return True, self._tiles[key]

    def put(self, key: Any, tile: np.ndarray | None) -> None:
        """Keep ``tile`` (None: an absent tile, counted at a nominal size so that a sparse slide's
        many absent tiles are evicted too), dropping the least recently used beyond the bound."""
        if _size(tile) > self.max_bytes:
            return
        with self._lock:
            if key in self._tiles:
                return
            self._tiles[key] = tile
            self._bytes += _size(tile)
            while self._bytes > self.max_bytes:
                _, old = self._tiles.popitem(last=False)
                self._bytes -= _size(old)


def _size(tile: np.ndarray | None) -> int:
    return tile.nbytes if tile is not None else 64


class TileFile:
    """The slide file, open for positioned reads (``os.pread``: no shared file position, so the
    reader threads need no lock).  Closed with the slide, or, for a slide that is never closed (a
    copy unpickled on a Dask worker), when the last reader using it is garbage-collected."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self._finalizer = weakref.finalize(self, os.close, self.fd)

    def read(self, count: int, offset: int) -> bytes:
        if not self._finalizer.alive:  # the number may already name another file
            raise ValueError("read from a closed slide")
        data = os.pread(self.fd, count, offset)
        if len(data) != count:
            raise OSError(f"{count} bytes at {offset} are cut short: {len(data)} read (truncated file?)")
        return data

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        self._finalizer()


class TiledPageReader:
    """Regions of one tiled TIFF page as uint8 RGB.  Missing tiles (byte count 0) are ``missing``:
    white by default, as OpenSlide composites their transparency over white."""

    def __init__(self, file: TileFile, page: Any, cache: TileCache, key: Any, missing: int = 255) -> None:
        self._file = file
        self._missing = missing
        self._decode = page.decode  # tifffile's decoder for this page (thread-safe: no shared state)
        self._tables = page.jpegtables
        self._offsets = page.dataoffsets
        self._counts = page.databytecounts
        self.tile_h, self.tile_w = int(page.tilelength), int(page.tilewidth)
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        self._across = -(-self.width // self.tile_w)
        self._cache = cache
        self._key = key

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels [x, x+w) x [y, y+h) of the page; the region must lie inside it."""
        if x < 0 or y < 0 or w <= 0 or h <= 0 or x + w > self.width or y + h > self.height:
            raise ValueError(f"region x={x} y={y} w={w} h={h} outside the {self.width}x{self.height} page")
        out = np.empty((h, w, 3), np.uint8)
        th, tw = self.tile_h, self.tile_w
        for ty in range(y // th, (y + h - 1) // th + 1):
            y0, y1 = max(y, ty * th), min(y + h, (ty + 1) * th)
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                x0, x1 = max(x, tx * tw), min(x + w, (tx + 1) * tw)
                tile = self._tile(ty * self._across + tx)
                dst = out[y0 - y : y1 - y, x0 - x : x1 - x]
                if tile is None:
                    dst[...] = self._missing
                else:
                    dst[...] = tile[y0 - ty * th : y1 - ty * th, x0 - tx * tw : x1 - tx * tw]
        return out

    def _tile(self, index: int) -> np.ndarray | None:
        key = (self._key, index)
        hit, tile = self._cache.get(key)
        if hit:
            return tile
        count = int(self._counts[index])
        if count == 0:
            tile = None
        else:
            data = self._file.read(count, int(self._offsets[index]))
            decoded, _, _ = self._decode(data, index, jpegtables=self._tables, _fullsize=True)
            tile = np.ascontiguousarray(decoded.reshape(self.tile_h, self.tile_w, -1)[:, :, :3])
        self._cache.put(key, tile)
        return tile


def page_reader(file: TileFile, page: Any, cache: TileCache, key: Any, missing: int = 255) -> TiledPageReader | None:
    """A reader for ``page`` if it is of the kind read exactly here, else None."""
    try:
        ok = (
            page.is_tiled
            and int(page.tiledepth) == 1
            and int(page.bitspersample) == 8
            and int(page.samplesperpixel) == 3
            and int(page.planarconfig) == 1
            and int(page.compression) in COMPRESSIONS
            and (int(page.photometric) == 2 or (int(page.photometric) == 6 and int(page.compression) in (7, 33003)))
            and page.dtype == np.uint8
            and len(page.dataoffsets) == len(page.databytecounts) > 0
        )
    except (AttributeError, TypeError, ValueError):
        return None
    return TiledPageReader(file, page, cache, key, missing) if ok else None


def agrees(reader: TiledPageReader, reference: Callable[[int, int, int, int], np.ndarray]) -> bool:
    """Whether ``reader`` gives the very bytes of ``reference(x, y, w, h)`` (the backend's own read)
    over the 2 x 2 tiles around the page's centre and over its last, partial tile (edge padding)."""
    w, h, tw, th = reader.width, reader.height, reader.tile_w, reader.tile_h
    regions = [(max(0, w // 2 - tw), max(0, h // 2 - th), min(2 * tw, w), min(2 * th, h)),
               (w - min(w, tw), h - min(h, th), min(w, tw), min(h, th))]
    return all(np.array_equal(reader.read(*r), reference(*r)) for r in regions)


def tile_decode_enabled() -> bool:
    """False when ``WSI_ESPNET_TILE_DECODE`` is 0, off, false or no: every read then goes through
    the backend's own path."""
    return os.environ.get("WSI_ESPNET_TILE_DECODE", "").strip().lower() not in ("0", "off", "false", "no")


class CheckedReaders(Mapping):
    """Level -> reader for the levels decoded here, each checked (:func:`agrees`) on its first use
    rather than at open: a slide read at one resolution pays for the checks of the levels it reads
    (the 8192² demo SVS: open 47 -> ~10 ms).  A level that fails its check, or whose check raises,
    is absent, so its reads go through the backend.  Thread-safe: one check per level."""

    def __init__(self, candidates: dict[int, tuple[TiledPageReader, Callable[..., np.ndarray]]]) -> None:
        self._unchecked = candidates
        self._readers: dict[int, TiledPageReader | None] = {}
        self._lock = threading.Lock()

    def get(self, level: int, default: Any = None) -> Any:  # the hot path: every read asks
        try:
            reader = self._readers[level]
        except KeyError:
            reader = self._check(level)
        return default if reader is None else reader

    def _check(self, level: int) -> TiledPageReader | None:
        with self._lock:
            if level not in self._readers:
                reader, reference = self._unchecked.pop(level, (None, None))
                try:
                    ok = reader is not None and agrees(reader, reference)
                except Exception:  # undecodable where checked: the backend reads it (and says why)
                    ok = False
                self._readers[level] = reader if ok else None
            return self._readers[level]

    def __getitem__(self, level: int) -> TiledPageReader:
        reader = self.get(level)
        if reader is None:
            raise KeyError(level)
        return reader

    def __iter__(self):
        """The levels that pass (checking every level not checked yet)."""
        for level in sorted(set(self._unchecked) | set(self._readers)):
            if self.get(level) is not None:
                yield level

    def __len__(self) -> int:
        return sum(1 for _ in self)


def checked_readers(path: str | os.PathLike, candidates: Iterable[tuple[int, Any, Callable[..., np.ndarray]]],
                    ) -> tuple[TileFile | None, Mapping[int, TiledPageReader]]:
    """Readers, sharing one file and one cache, for the candidate levels (``(level, page,
    reference)``: ``reference(x, y, w, h)`` is the backend's own read of that level) that this
    module reads, used once their reads :func:`agrees` with the reference (:class:`CheckedReaders`);
    and their file, or None and no readers when no level can be read here (or
    :func:`tile_decode_enabled` says the decoder is off)."""
    if not tile_decode_enabled():
        return None, {}
    file, cache, readable = TileFile(path), TileCache(), {}
    for level, page, reference in candidates:
        reader = page_reader(file, page, cache, level)
        if reader is not None:
            readable[level] = (reader, reference)
    if not readable:
        file.close()
        return None, {}
    return file, CheckedReaders(readable)
