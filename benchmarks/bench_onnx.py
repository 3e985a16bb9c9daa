"""ESPNet on this CPU: PyTorch eager, optimised PyTorch, ONNX Runtime float32 and int8.

    python benchmarks/bench_onnx.py                       # released Cityscapes p=2 q=8, 1024x512, batch 1
    python benchmarks/bench_onnx.py --size 512x512 --tissue-model wsi_espnet/weights/tissue_demo.pt

Prints one table (ms per frame, median and min over --repeats runs after --warmup, and frames/s
from the median; see time_blocks for the order of runs) and the int8 accuracy cost: arg-max agreement with float32 on photos held out from
calibration (all pixels, and pixels where float32's top-2 logit margin is at least 1), and, with
--tissue-model, mIoU of float32 and int8 against the exact truth of a synthetic H&E demo slide.

The ONNX files are exported with subnormal weights zeroed (wsi_espnet.export.flush_subnormals_),
as the fast PyTorch path also does; eager PyTorch on the weights as loaded is the slow baseline.

Timings are wall-clock on a shared machine: other processes running at the same time slow every
row, so the load average before and after is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsi_espnet.checkpoint import DEFAULT_MODEL, load_model  # noqa: E402
from wsi_espnet.export import export_onnx, model_metadata, set_metadata  # noqa: E402
from wsi_espnet.engine import available_cores  # noqa: E402
from wsi_espnet.onnx_engine import OnnxEngine  # noqa: E402
from wsi_espnet.predict import resize_bilinear  # noqa: E402
from wsi_espnet.quantize import argmax_agreement, quantize_int8  # noqa: E402

RELEASED = ROOT.parent / "shared" / "espnet-pretrained" / "decoder" / "espnet_p_2_q_8.pth"
CALIBRATION_PHOTOS = ("astronaut", "coffee", "chelsea", "hubble_deep_field", "immunohistochemistry", "camera")
HELD_OUT_PHOTOS = ("rocket", "retina", "moon", "coins")


def photo(name: str, size: tuple[int, int]) -> np.ndarray:
    """A scikit-image sample photo as uint8 RGB at (height, width)."""
    from skimage import data

    img = getattr(data, name)()
    img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
    return resize_bilinear(img, size).round().astype(np.uint8)


def time_blocks(runners: dict[str, object], repeats: int, warmup: int, rounds: int = 2) -> dict[str, tuple[float, float]]:
    """(median, min) seconds per runner.  Each runner runs in blocks (warm-up, then its share of
    the repeats), the blocks in ``rounds`` rounds: blocks, so that one engine's idle threads
    (OpenMP's or ONNX Runtime's spin-waits) do not slow the next engine's call; rounds, so that
    load from other processes, which comes and goes, falls on every engine alike."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    per_round = max(1, repeats // rounds)
    for _ in range(rounds):
        for name, fn in runners.items():
            for _ in range(warmup):
                fn()
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: (float(np.median(t)), float(np.min(t))) for name, t in times.items()}


def torch_runner(model, frame: np.ndarray, threads: int, flush_denormal: bool = False):
    """One eager forward.  ``flush_denormal`` turns on the CPU's flush-to-zero for the call: the
    released weights hold ~30k subnormal values, which x86 computes with in slow microcode."""
    import torch

    torch.set_num_threads(threads)
    x = torch.from_numpy(np.ascontiguousarray(model.config.normalization.apply(frame).transpose(0, 3, 1, 2)))

    def run():
        torch.set_flush_denormal(flush_denormal)
        try:
            with torch.inference_mode():
                return model(x)
        finally:
            torch.set_flush_denormal(False)

    return run


def margin_agreement(reference: OnnxEngine, candidate: OnnxEngine, tiles, min_margin: float = 1.0) -> float:
    """Agreement on the pixels float32 is sure of (top-2 logit margin >= ``min_margin``)."""
    same = total = 0
    for tile in tiles:
        ref = reference.logits_numpy(tile[None])
        top2 = np.sort(ref, axis=1)[:, -2:]
        sure = (top2[:, 1] - top2[:, 0]) >= min_margin
        same += int(((ref.argmax(1) == candidate.logits_numpy(tile[None]).argmax(1)) & sure).sum())
        total += int(sure.sum())
    return same / total if total else float("nan")


def demo_miou(model_path: Path, work: Path, tiles: int) -> list[str]:
    """float32 vs int8 mIoU of a tissue model on demo-slide tiles with exact truth: calibration on
    one demo slide (seed 0), evaluation on another (seed 1)."""
    from wsi_espnet.demo import DemoSlideSpec
    from wsi_espnet.metrics import confusion_matrix, mean_iou

    model = load_model(model_path)
    cfg = model.config
    t, mpp = cfg.slide.tile, cfg.slide.mpp

    def demo_tiles(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        side = int(np.ceil(np.sqrt(tiles)))
        base = 2 * (side + 1) * t  # a 0.5x-mpp scan with room for every tile and half a tile of margin
        spec = DemoSlideSpec(base, base, mpp / 2, seed)
        out = []
        for i in range(tiles):
            x, y = (i % side) * t + t // 2, (i // side) * t + t // 2
            out.append(spec.render(x, y, t, t, mpp))
        return out

    fp32, int8 = work / "tissue.onnx", work / "tissue_int8.onnx"
    export_onnx(model, fp32, overwrite=True)
    quantize_int8(fp32, int8, [rgb for rgb, _ in demo_tiles(0)])
    set_metadata(int8, model_metadata(model, "int8"))
    held = demo_tiles(1)
    lines = []
    engines = {"float32": OnnxEngine(fp32, device="cpu"), "int8": OnnxEngine(int8, device="cpu")}
    for name, engine in engines.items():
        cm = sum(
            confusion_matrix(truth, engine.logits_numpy(rgb[None])[0].argmax(0), cfg.num_classes, cfg.ignore_index)
            for rgb, truth in held
        )
        lines.append(f"demo-slide mIoU ({name}, {len(held)} held-out {t}x{t} tiles at {mpp:g} µm/px): {mean_iou(cm):.4f}")
    agree = argmax_agreement(engines["float32"], engines["int8"], [rgb for rgb, _ in held])
    lines.append(f"demo-slide int8 argmax agreement with float32: {agree:.4f}")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=RELEASED)
    p.add_argument("--size", default="1024x512", help="frame WxH (default 1024x512)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=available_cores())
    p.add_argument("--spin", action="store_true", help="let ONNX Runtime's idle threads spin (a dedicated box)")
    p.add_argument("--tissue-model", type=Path, default=DEFAULT_MODEL,
                   help="tissue model whose float32/int8 mIoU is measured on demo-slide tiles (default: the shipped one)")
    p.add_argument("--tissue-tiles", type=int, default=8)
    args = p.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    load_before = os.getloadavg()

    model = load_model(args.model)
    frame = photo("rocket", (h, w))[None]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fp32, int8 = work / "model.onnx", work / "model_int8.onnx"
        export_onnx(model, fp32)
        t0 = time.perf_counter()
        quantize_int8(fp32, int8, [photo(n, (h, w)) for n in CALIBRATION_PHOTOS])
        quant_s = time.perf_counter() - t0
        set_metadata(int8, model_metadata(model, "int8"))

        runners = {
            "PyTorch eager (float32, NCHW; weights as loaded)": torch_runner(model, frame, args.threads),
            "PyTorch eager, flush-to-zero on (torch.set_flush_denormal)": torch_runner(model, frame, args.threads, True),
        }
        try:
            from wsi_espnet.fastpath import optimize_for_inference
        except ImportError:
            optimize_for_inference = None
        if optimize_for_inference is not None:
            fast = optimize_for_inference(model, example_shape=(1, 3, h, w))
            fast.config = model.config
            runners["PyTorch optimised (fastpath: folded BN, channels-last)"] = torch_runner(fast, frame, args.threads)
        engines = {}
        for name, path in (("float32", fp32), ("int8", int8)):
            engines[name] = engine = OnnxEngine(path, device="cpu", threads=args.threads, spin=args.spin)
            runners[f"ONNX Runtime {name}"] = lambda e=engine: e.logits_numpy(frame)
        rows = list(time_blocks(runners, args.repeats, args.warmup).items())

        held = [photo(n, (h, w)) for n in HELD_OUT_PHOTOS]
        per_photo = {n: argmax_agreement(engines["float32"], engines["int8"], [t]) for n, t in zip(HELD_OUT_PHOTOS, held)}
        overall = argmax_agreement(engines["float32"], engines["int8"], held)
        sure = margin_agreement(engines["float32"], engines["int8"], held)
    load_after = os.getloadavg()

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"\n{args.model.name} at {w}x{h}, batch 1, {args.threads} thread(s) on {cpu} ({os.cpu_count()} cores visible)")
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} (other processes share these cores)\n")
    print("| engine | ms/frame (median) | ms/frame (min) | frames/s |")
    print("|---|---:|---:|---:|")
    for name, (med, best) in rows:
        print(f"| {name} | {med * 1e3:.0f} | {best * 1e3:.0f} | {1 / med:.2f} |")
    print(f"\nint8: static QDQ, Conv/ConvTranspose only, per-channel int8 weights, uint8 activations with "
          f"99.999th-percentile ranges from {len(CALIBRATION_PHOTOS)} photos at {w}x{h} ({quant_s:.0f} s)")
    print(f"int8 argmax agreement with float32 on {len(held)} held-out photos: {overall:.4f} "
          f"({', '.join(f'{n} {a:.3f}' for n, a in per_photo.items())}); "
          f"on pixels where float32's top-2 margin >= 1: {sure:.4f}")
    sys.stdout.flush()
    if not args.tissue_model.is_file():
        print(f"(no tissue model at {args.tissue_model}: demo-slide mIoU skipped)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for line in demo_miou(args.tissue_model, Path(tmp), args.tissue_tiles):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
