"""Shared test fixtures.  Keep these stable: several test files depend on them.

Paths
  shared_dir        ../shared (read-only data next to the repository; never copied into it)
  slides_dir        ../shared/slides (real slide files, see its README.md)

Demo slides (written once per test session with wsi_espnet.demo, in a session tmp folder)
  demo_spec         DemoSlideSpec(2048, 1536, mpp=0.5, seed=0): the content and truth of the two below
  demo_svs          Path of that slide as an Aperio SVS: tiled 256 px JPEG q90, 4 levels
                    (2048x1536, 1024x768, 512x384, 256x192; downsamples 1, 2, 4, 8), OpenSlide vendor
                    aperio, mpp 0.5, objective power 20, a thumbnail associated image
  demo_ome          Path of the same content as pyramidal OME-TIFF (SubIFDs, PhysicalSizeX/Y 0.5 µm);
                    its pixels equal demo_svs's level by level
  demo_truth_png    Path of the class-id PNG of demo_spec at 1 µm/px (1024x768, pixel = class id
                    of configs/breast_biopsy.yaml), equal to demo_spec.labels(0, 0, 1024, 768, 1.0)
  tiny_svs          Path of a 200x150 demo SVS (seed 1): smaller than one tile, one level
  empty_svs         Path of a 1024x768 demo SVS with no tissue at all (glass only), 3 levels

Use demo_spec.labels(x, y, w, h, mpp) / .rgb(...) for the truth of any region at any resolution.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_espnet.demo import DemoSlideSpec, write_demo_slide, write_truth

SHARED = Path(__file__).resolve().parents[2] / "shared"
_SHARED_PARTS = ("espnet-pretrained", "slides", "docs")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop at once, in one line, when the data folder beside the checkout is missing: otherwise
    dozens of tests fail, each with its own missing-file traceback."""
    missing = [part for part in _SHARED_PARTS if not (SHARED / part).is_dir()]
    if missing:
        pytest.exit(f"the tests read {SHARED} (the released ESPNet checkpoints, real slides, QuPath notes: "
                    f"not in the repository); missing there: {', '.join(missing)}. Clone beside that "
                    f"folder (README, 'Install').", returncode=4)

DEMO_SIZE = (2048, 1536)
DEMO_MPP = 0.5
DEMO_SEED = 0


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def slides_dir(shared_dir: Path) -> Path:
    return shared_dir / "slides"


@pytest.fixture(scope="session")
def demo_spec() -> DemoSlideSpec:
    return DemoSlideSpec(*DEMO_SIZE, mpp=DEMO_MPP, seed=DEMO_SEED)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="session")
def demo_svs(demo_dir: Path) -> Path:
    return write_demo_slide(demo_dir / "demo.svs", *DEMO_SIZE, mpp=DEMO_MPP, seed=DEMO_SEED)


@pytest.fixture(scope="session")
def demo_ome(demo_dir: Path) -> Path:
    return write_demo_slide(demo_dir / "demo.ome.tif", *DEMO_SIZE, mpp=DEMO_MPP, seed=DEMO_SEED, fmt="ome")


@pytest.fixture(scope="session")
def demo_truth_png(demo_dir: Path, demo_spec: DemoSlideSpec) -> Path:
    return write_truth(demo_dir / "demo_truth_1um.png", demo_spec, mpp=1.0)


@pytest.fixture(scope="session")
def tiny_svs(demo_dir: Path) -> Path:
    return write_demo_slide(demo_dir / "tiny.svs", 200, 150, mpp=DEMO_MPP, seed=1)


@pytest.fixture(scope="session")
def empty_svs(demo_dir: Path) -> Path:
    from wsi_espnet import demo

    return demo.write_demo_slide(demo_dir / "empty.svs", 1024, 768, mpp=DEMO_MPP, seed=2, empty=True)


class RecordedArray:
    """A real array (Zarr or NumPy) with every region read from it or written to it noted (the index
    keys, in order): lets a test check that a writer touches only what it must."""

    def __init__(self, array) -> None:
        self.array, self.reads, self.writes = array, [], []
        self.shape, self.dtype, self.chunks = array.shape, array.dtype, getattr(array, "chunks", None)

    def __getitem__(self, key):
        self.reads.append(key)
        return self.array[key]

    def __setitem__(self, key, value) -> None:
        self.writes.append(key)
        self.array[key] = value


@pytest.fixture
def recorded():
    """``recorded(array)``: the array wrapped in a :class:`RecordedArray`."""
    return RecordedArray
