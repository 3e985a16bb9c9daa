"""Dataset readers on tiny folder trees in the public layouts, and labelled patch stores cut from a
real SVS with its truth exported as QuPath GeoJSON."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from wsi_espnet.augment import HEAugment, StreetAugment
from wsi_espnet.config import load_config, with_overrides
from wsi_espnet.datasets import (
    PatchDataset,
    build_split_stores,
    cityscapes_pairs,
    decode_cityscapes,
    find_labelled_slides,
    image_folder_dataset,
    voc_pairs,
)
from wsi_espnet.errors import InputWarning, UserError


def _png(path: Path, array: np.ndarray, palette: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if palette is not None:
        img = img.convert("P") if img.mode != "P" else img
        img.putpalette(palette.reshape(-1).tolist())
    img.save(path)


# ------------------------------------------------------------------------------------ Cityscapes


def test_cityscapes_layout_train_ids_and_label_ids(tmp_path):
    cfg = with_overrides(load_config("cityscapes"), [f"data.root={tmp_path}"])
    rng = np.random.default_rng(0)
    for city, stem in (("aachen", "aachen_000000_000019"), ("bochum", "bochum_000000_000313")):
        _png(tmp_path / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png", rng.integers(0, 255, (32, 64, 3), dtype=np.uint8))
    train_ids = np.zeros((32, 64), np.uint8)
    train_ids[:, 32:] = 13  # car
    train_ids[0, :] = 255
    _png(tmp_path / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png", train_ids)
    label_ids = np.full((32, 64), 7, np.uint8)  # road
    label_ids[:, :10] = 26  # car
    label_ids[:, 10:12] = 4  # static: not evaluated
    _png(tmp_path / "gtFine" / "train" / "bochum" / "bochum_000000_000313_gtFine_labelIds.png", label_ids)

    pairs = cityscapes_pairs(tmp_path, "train")
    assert [p[0].parent.name for p in pairs] == ["aachen", "bochum"]
    a = decode_cityscapes(pairs[0][1], cfg.ignore_index)
    assert cfg.ignore_index == 19 and (a[0] == 19).all() and (a[1:, 32:] == 13).all()
    b = decode_cityscapes(pairs[1][1], cfg.ignore_index)  # labelIds converted to train ids
    assert (b[:, :10] == 13).all() and (b[:, 10:12] == 19).all() and (b[:, 12:] == 0).all()

    ds = image_folder_dataset(cfg, "train", StreetAugment(crop=(32, 16), ignore_index=19))
    x, y = ds[0]
    # base size = the config's input_size (1024x512), then a random 32x16 crop
    assert x.shape == (3, 16, 32) and x.dtype == torch.float32 and y.shape == (16, 32) and y.dtype == torch.int64
    assert set(ds.class_counts().nonzero()[0]) == {0, 13}
    train_ids[5, 5] = 25  # not a train id: named before any training, not the loss's error mid-epoch
    _png(tmp_path / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png", train_ids)
    with pytest.raises(UserError, match=r"label value\(s\) \[25\] are not Cityscapes train ids \(0-18"):
        decode_cityscapes(pairs[0][1], cfg.ignore_index)

    (tmp_path / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png").unlink()
    with pytest.raises(UserError, match="without gtFine labels"):
        cityscapes_pairs(tmp_path, "train")
    with pytest.raises(UserError, match="leftImg8bit/val"):
        cityscapes_pairs(tmp_path, "val")


# ------------------------------------------------------------------------------------ PASCAL VOC


def test_camvid_segnet_layout_trains_from_the_shipped_config(tmp_path):
    """configs/camvid.yaml (the released CamVid model's) reads ROOT/{split} + ROOT/{split}annot."""
    cfg = with_overrides(load_config("camvid"), [f"data.root={tmp_path}"])
    lab = np.zeros((36, 48), np.uint8)
    lab[:, 24:] = 3  # road
    lab[0] = 11  # void: the config's ignore id
    for name in ("0001TP_006690.png", "0001TP_006720.png"):
        _png(tmp_path / "train" / name, np.full((36, 48, 3), 90, np.uint8))
        _png(tmp_path / "trainannot" / name, lab)
    ds = image_folder_dataset(cfg, "train")
    assert len(ds) == 2
    _, got = ds.raw(0)
    assert set(np.unique(got).tolist()) <= {0, 3, 11} and (got == 11).any() and (got == 3).any()
    bad = lab.copy()
    bad[1, 1] = 40
    _png(tmp_path / "trainannot" / "0001TP_006720.png", bad)
    with pytest.raises(UserError, match="label value\\(s\\) \\[40\\] are not class ids"):
        image_folder_dataset(cfg, "train").raw(1)
    with pytest.raises(UserError, match="the CamVid layout is"):
        image_folder_dataset(cfg, "val")


def test_voc_layout_palette_png_is_read_as_indices(tmp_path):
    cfg = with_overrides(load_config("voc"), [f"data.root={tmp_path}"])
    ids = ["2007_000032", "2007_000039"]
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    palette = np.zeros((256, 3), np.uint8)
    palette[: cfg.num_classes] = cfg.palette
    palette[255] = (224, 224, 192)
    lab = np.zeros((20, 30), np.uint8)
    lab[5:15, 5:15] = 15  # person
    lab[4, 4:16] = 255  # object border
    for i in ids:
        (tmp_path / "JPEGImages").mkdir(exist_ok=True)
        Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(tmp_path / "JPEGImages" / f"{i}.jpg")
    _png(tmp_path / "SegmentationClass" / f"{ids[0]}.png", lab, palette)
    # The same mask re-saved as RGB colours: mapped back through the config's palette.
    Image.fromarray(palette[lab]).save(tmp_path / "SegmentationClass" / f"{ids[1]}.png")

    ds = image_folder_dataset(cfg, "train")
    for k in range(2):
        rgb, got = ds.raw(k)
        assert rgb.shape == (20, 30, 3)
        np.testing.assert_array_equal(got, lab)  # 255 stays the ignore index (VOC's own)
    assert len(voc_pairs(tmp_path, "train")) == 2
    with pytest.raises(UserError, match="val.txt"):
        voc_pairs(tmp_path, "val")


# ------------------------------------------------------------------------------------ BCSS


def test_the_shipped_bcss_config_reads_a_bcss_download_as_it_is(tmp_path):
    """configs/bcss.yaml with only data.root given: BCSS's codes grouped, 0 and 'exclude' ignored."""
    root = tmp_path / "BCSS"
    name = "TCGA-A2-A0CM-DX1_xmin18562_ymin56852_MPP-0.2500.png"
    mask = np.zeros((128, 128), np.uint8)
    mask[:, 32:64], mask[:, 64:96], mask[:, 96:] = 20, 9, 7  # dcis -> Tumor, fat -> Other, exclude
    mask[:4, 96:] = 30  # a code BCSS does not have: ignored, and said so
    _png(root / "rgbs_colorNormalized" / name, np.full((128, 128, 3), 200, np.uint8))
    _png(root / "masks" / name, mask)
    (root / "train.txt").write_text(name[:-4] + "\n")
    cfg = with_overrides(load_config("bcss"), [f"data.root={root}", "train.crop=[16,16]", "data.min_labelled=0.1"])
    assert cfg.class_names == ["Tumor", "Stroma", "Inflammatory", "Necrosis", "Other"]
    with pytest.warns(InputWarning, match=r"mask code\(s\) 30 are not in data.class_map") as caught:
        stores = build_split_stores(cfg, "train", tmp_path / "cache", purpose="train", workers=1)
    assert not any(" 7" in str(w.message) for w in caught)  # 'exclude' is listed as ignore: no word
    labels = np.asarray(zarr.open_group(str(stores[0]), mode="r")["labels"][...])
    assert set(np.unique(labels)) == {0, 4, 255}  # Tumor, Other, ignored


def test_bcss_split_folders_name_a_missing_mask_and_a_missing_split(tmp_path):
    from wsi_espnet.datasets import find_bcss_tiles

    cfg = load_config("bcss")
    for name in ("a_MPP-0.2500.png", "b_MPP-0.2500.png"):
        _png(tmp_path / "train" / "images" / name, np.full((32, 32, 3), 200, np.uint8))
    _png(tmp_path / "train" / "masks" / "a_MPP-0.2500.png", np.ones((32, 32), np.uint8))
    with pytest.raises(UserError, match="1 listed tile\\(s\\) lack an image or a mask, e.g. b_MPP"):
        find_bcss_tiles(tmp_path, "train", cfg)  # b's image has no mask: never silently left out
    with pytest.raises(UserError, match="no split 'test'"):
        find_bcss_tiles(tmp_path, "test", cfg)
    with pytest.raises(UserError, match="code 'x' is not a whole number"):
        find_bcss_tiles(tmp_path, "train", with_overrides(cfg, ["data.class_map={x: Tumor}"]))


def test_a_bcss_mask_of_another_size_than_its_tile_is_refused(tmp_path):
    """A half-size mask (a resized export, or the wrong file) would be resampled onto the tile and
    shifted against it: refused, naming both sizes."""
    name = "a_MPP-0.2500.png"
    _png(tmp_path / "train" / "images" / name, np.full((64, 64, 3), 200, np.uint8))
    _png(tmp_path / "train" / "masks" / name, np.ones((32, 32), np.uint8))
    cfg = with_overrides(load_config("bcss"), [f"data.root={tmp_path}", "train.crop=[16,16]"])
    with pytest.raises(UserError, match="must be its tile's size, 64x64, got 32x32"):
        build_split_stores(cfg, "train", tmp_path / "cache", purpose="train", workers=1)


def test_bcss_tiles_with_code_map_become_labelled_patch_stores(tmp_path):
    root = tmp_path / "bcss"
    name = "TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500.png"
    rgb = np.full((128, 128, 3), 200, np.uint8)
    mask = np.zeros((128, 128), np.uint8)  # 0: outside the annotated region
    mask[:, 32:64] = 1  # tumor
    mask[:, 64:96] = 2  # stroma
    mask[:, 96:] = 7  # 'exclude': not in the class map
    _png(root / "images" / name, rgb)
    _png(root / "masks" / name, mask)
    (root / "train.txt").write_text(name[:-4] + "\n")
    cfg = with_overrides(load_config("breast_biopsy"), [
        "data.layout=bcss", f"data.root={root}", "data.class_map={1: Malignant epithelium, 2: Normal stroma}",
        "train.crop=[16,16]", "data.min_labelled=0.1",
    ])
    with pytest.warns(InputWarning, match=r"mask code\(s\) 7 are not in data.class_map"):  # 'exclude'
        stores = build_split_stores(cfg, "train", tmp_path / "cache", purpose="train", workers=1)
    g = zarr.open_group(str(stores[0]), mode="r")
    # 0.25 µm/px tiles read at the config's 1 µm/px: 128 px -> 32 px, cut into 16 px patches, half overlap.
    assert g.attrs["grid"]["image_size"] == [32, 32]
    labels, xy = np.asarray(g["labels"][...]), np.asarray(g["xy"][...])
    expected = np.full((32, 32), 255, np.uint8)
    expected[:, 8:16], expected[:, 16:24] = 2, 3  # tumor -> Malignant epithelium, stroma -> Normal stroma
    for lab, (x, y) in zip(labels, xy):
        np.testing.assert_array_equal(lab, expected[y : y + 16, x : x + 16])
    assert set(np.unique(labels)) == {2, 3, 255}
    assert {int(x) for x in xy[:, 0]} == {0, 8, 16}  # the x=24 column is wholly unlabelled: not cut

    bad = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, class_map={1: "Tumour cells"}))
    with pytest.raises(UserError, match="Tumour cells"):
        build_split_stores(bad, "train", tmp_path / "cache2", purpose="train")
    (root / "train.txt").unlink()
    with pytest.raises(UserError, match="no official split"):
        build_split_stores(cfg, "train", tmp_path / "cache3", purpose="train")


# ------------------------------------------------------------------------------------ slides + GeoJSON


@pytest.fixture(scope="module")
def annotated_root(tmp_path_factory, demo_svs, demo_spec):
    """root/train/demo.svs (a link to the session's demo slide) + demo.geojson of its truth."""
    from wsi_espnet.datasets import _LazyTruth
    from wsi_espnet.geojson import write_geojson

    root = tmp_path_factory.mktemp("slides")
    (root / "train").mkdir()
    os.symlink(demo_svs, root / "train" / "demo.svs")
    cfg = load_config("breast_biopsy")
    write_geojson(root / "train" / "demo.geojson", _LazyTruth(demo_spec, 1.0), 1.0 / demo_spec.mpp,
                  class_names=cfg.class_names, colors=[c.color for c in cfg.classes], mpp=1.0, exclude=())
    return root


def test_slide_with_geojson_gives_patches_whose_labels_are_the_truth(annotated_root, demo_spec, tmp_path):
    cfg = with_overrides(load_config("breast_biopsy"), [f"data.root={annotated_root}", "train.crop=[128,128]"])
    stores = build_split_stores(cfg, "train", tmp_path, purpose="train", workers=2)
    g = zarr.open_group(str(stores[0]), mode="r")
    xy = np.asarray(g["xy"][...])
    assert g.attrs["mpp"] == 1.0 and g.attrs["tile"] == 128 and len(xy) > 20
    rng = np.random.default_rng(0)
    for i in rng.choice(len(xy), 4, replace=False):
        x, y = (int(v) for v in xy[i])
        truth = demo_spec.labels(x, y, 128, 128, 1.0)
        np.testing.assert_array_equal(np.asarray(g["labels"][i]), truth)
        assert np.asarray(g["class_pixels"][i]).sum() == 128 * 128
    # A second build with the same recipe reuses the store.
    mtime = (stores[0] / "zarr.json").stat().st_mtime_ns
    again = build_split_stores(cfg, "train", tmp_path, purpose="train", workers=2)
    assert again == stores and (stores[0] / "zarr.json").stat().st_mtime_ns == mtime

    ds = PatchDataset(stores, cfg, augment=None)
    x, y = ds[0]
    assert x.shape == (3, 128, 128) and y.shape == (128, 128)
    # Class-balanced sampling: patches showing a rare class are drawn more often than stroma-only ones.
    w = ds.sampling_weights()
    share = ds.class_pixels / ds.class_pixels.sum(1, keepdims=True)
    rare = share[:, 6] > 0.05  # blood, ~1 % of the slide
    plain = share[:, 3] > 0.95  # nearly all normal stroma
    assert rare.any() and plain.any()
    assert w[rare].mean() > 2 * w[plain].mean()
    sampled = ds.sampled_class_counts() / ds.sampled_class_counts().sum()
    raw = ds.class_counts() / ds.class_counts().sum()
    assert sampled[6] > raw[6] and sampled[3] < raw[3]


def test_slide_folder_errors(annotated_root, tmp_path):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    os.symlink(annotated_root / "train" / "demo.svs", empty / "train" / "other.svs")
    with pytest.warns(UserWarning, match="without annotations"), pytest.raises(UserError, match="empty dataset"):
        find_labelled_slides(empty, "train")
    with pytest.raises(UserError, match="no folder"):
        find_labelled_slides(empty, "val")
    # A GeoJSON whose class names are not the config's: the error names them.
    (empty / "train" / "other.geojson").write_text(json.dumps({"type": "Feature", "properties": {"classification": "Lymphocytes"},
                                                               "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 0]]]}}))
    cfg = with_overrides(load_config("breast_biopsy"), [f"data.root={empty}", "train.crop=[128,128]"])
    with pytest.raises(UserError, match="Lymphocytes"):
        build_split_stores(cfg, "train", tmp_path / "c", purpose="train")


# ------------------------------------------------------------------------------------ augmentation


def test_augmentation_moves_labels_with_the_image():
    rng = np.random.default_rng(1)
    label = np.zeros((64, 64), np.uint8)
    label[8:30, 10:50] = 1
    label[40:60, 5:20] = 2
    image = np.stack([label * 100, label * 50, 255 - label * 100], -1).astype(np.uint8)
    geometric = HEAugment(hed_scale=0, hed_shift=0, brightness=0, contrast=0, saturation=0)
    for _ in range(10):
        img, lab = geometric(image, label, rng)
        assert img.shape == image.shape and lab.shape == label.shape and lab.dtype == np.uint8
        # The image's red channel still encodes the label (up to interpolation at the edges).
        agree = (np.rint(img[..., 0] / 100.0) == lab).mean()
        assert agree > 0.93
        assert set(np.unique(lab)) <= {0, 1, 2}
    # Colour jitter changes colours only.
    colour = HEAugment(scale=(1.0, 1.0))
    img, lab = colour(image, label, np.random.default_rng(2))
    assert sorted(np.bincount(lab.ravel(), minlength=3)) == sorted(np.bincount(label.ravel(), minlength=3))
    street = StreetAugment(crop=(40, 24), ignore_index=255)
    img, lab = street(image, label, np.random.default_rng(3))
    assert img.shape == (24, 40, 3) and lab.shape == (24, 40)
