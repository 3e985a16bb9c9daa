"""The wheel a lab installs on cluster workers (not an editable checkout) must carry what the
checkout has beside the package: the dataset configs and the shipped model."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def test_a_wheel_install_finds_the_configs_and_the_shipped_model(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("wsi_espnet-*.whl"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert sorted(p.name for p in (site / "wsi_espnet" / "configs").glob("*.yaml")) == sorted(
        p.name for p in (REPO / "configs").glob("*.yaml"))
    released = SHARED / "espnet-pretrained" / "decoder" / "espnet_p_2_q_8.pth"
    code = (f"import sys; sys.path.insert(0, {str(site)!r}); import wsi_espnet; "
            "from wsi_espnet.config import load_config; "
            "print(wsi_espnet.__file__); print(load_config('bcss').num_classes); "
            f"print(wsi_espnet.load_model().config.name); print(wsi_espnet.load_model({str(released)!r}).config.name)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0].startswith(str(site)) and lines[1:] == ["5", "demo_tissue", "cityscapes"]
