"""Model files: our own checkpoints round-trip with everything needed to use them; bad files get one
clear error; a pickle that would run code is refused."""

import pickle
from pathlib import Path

import pytest
import torch

import wsi_espnet
from wsi_espnet.checkpoint import describe_state_dict
from wsi_espnet.config import load_config
from wsi_espnet.errors import ModelFileError
from wsi_espnet.espnet import ESPNet, ESPNetC

SHARED = Path(__file__).resolve().parents[2] / "shared"


def test_own_checkpoint_round_trip(tmp_path):
    cfg = load_config("breast_biopsy")
    net = ESPNet(cfg.num_classes, 2, 3)
    path = wsi_espnet.save_checkpoint(tmp_path / "m.pt", net, cfg, metrics={"miou": 0.5}, command="x")
    model = wsi_espnet.load_model(path)
    assert model.config == cfg
    assert model.arch == {"variant": "espnet", "classes": 8, "p": 2, "q": 3, "skip": "level1"}
    assert model.meta["metrics"] == {"miou": 0.5}
    x = torch.randn(1, 3, 64, 64)
    net.eval()
    with torch.no_grad():
        assert torch.equal(model(x), net(x))
    # the file is a plain-weights file
    torch.load(path, weights_only=True)


def test_encoder_only_checkpoint_returns_full_size_logits(tmp_path):
    cfg = load_config("breast_biopsy")
    path = wsi_espnet.save_checkpoint(tmp_path / "c.pt", ESPNetC(8, 2, 3), cfg)
    model = wsi_espnet.load_model(path)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 96)).shape == (2, 8, 64, 96)


def test_config_and_weights_that_disagree_are_named(tmp_path):
    cfg = load_config("breast_biopsy")
    path = wsi_espnet.save_checkpoint(tmp_path / "m.pt", ESPNet(8, 2, 3), cfg)
    payload = torch.load(path, weights_only=True)
    payload["arch"]["classes"] = 20
    torch.save(payload, tmp_path / "bad_classes.pt")
    with pytest.raises(ModelFileError, match="8 classes but the model has 20 outputs"):
        wsi_espnet.load_model(tmp_path / "bad_classes.pt")
    payload = torch.load(path, weights_only=True)
    payload["arch"]["q"] = 5
    torch.save(payload, tmp_path / "bad_q.pt")
    with pytest.raises(ModelFileError, match="missing key"):
        wsi_espnet.load_model(tmp_path / "bad_q.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_code_in_a_model_file_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Evil()}, path)
    with pytest.raises(ModelFileError, match="refused"):
        wsi_espnet.load_model(path)
    assert "this must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"", b"not a model", b"PK\x03\x04truncated"])
def test_garbage_and_truncated_files(tmp_path, content):
    path = tmp_path / "m.pt"
    path.write_bytes(content)
    with pytest.raises(ModelFileError):
        wsi_espnet.load_model(path)


def test_truncated_real_file(tmp_path):
    blob = (SHARED / "espnet-pretrained/decoder/espnet_p_2_q_3.pth").read_bytes()
    (tmp_path / "t.pth").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ModelFileError):
        wsi_espnet.load_model(tmp_path / "t.pth")


def test_missing_and_directory(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        wsi_espnet.load_model(tmp_path / "nope.pt")
    with pytest.raises(ModelFileError, match="directory"):
        wsi_espnet.load_model(tmp_path)


def test_describe_state_dict_tells_the_decoder_variant():
    sd = torch.load(SHARED / "espnet-pretrained/decoder/espnet_p_2_q_8_camvid.pth", map_location="cpu", weights_only=True)
    assert describe_state_dict(sd) == {"variant": "espnet", "classes": 12, "p": 2, "q": 8, "skip": "level1_reinforced"}


def test_bare_state_dict_of_unknown_class_count_is_refused(tmp_path):
    torch.save(ESPNet(5, 2, 3).state_dict(), tmp_path / "five.pth")
    with pytest.raises(ModelFileError, match="5 classes"):
        wsi_espnet.load_model(tmp_path / "five.pth")


def test_an_encoder_saved_without_its_decoder_is_a_named_error_and_dataparallel_files_load(tmp_path):
    released = torch.load(SHARED / "espnet-pretrained/decoder/espnet_p_2_q_8.pth", map_location="cpu",
                          weights_only=True)
    encoder_only = {k: v for k, v in released.items() if k.startswith("encoder.")}
    torch.save(encoder_only, tmp_path / "enc.pth")
    with pytest.raises(ModelFileError, match=r"enc\.pth: an ESPNet encoder .* without the decoder"):
        wsi_espnet.load_model(tmp_path / "enc.pth")
    # Saved from nn.DataParallel: every key under "module.", the same weights.
    torch.save({f"module.{k}": v for k, v in released.items()}, tmp_path / "dp.pth")
    plain, wrapped = (wsi_espnet.load_model(p) for p in (SHARED / "espnet-pretrained/decoder/espnet_p_2_q_8.pth",
                                                         tmp_path / "dp.pth"))
    x = torch.rand(1, 3, 64, 128)
    with torch.no_grad():
        assert torch.equal(plain(x), wrapped(x))


def test_a_data_folder_named_like_a_config_does_not_hide_the_config(tmp_path, monkeypatch):
    """`wsi-espnet train bcss data.root=bcss` run beside the data: the name is still the shipped
    config, and the released files (whose config is looked up by name) still load."""
    for name in ("bcss", "cityscapes"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_config("bcss").name == "bcss"
    assert wsi_espnet.load_model(SHARED / "espnet-pretrained/decoder/espnet_p_2_q_8.pth").config.name == "cityscapes"
