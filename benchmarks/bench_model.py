"""ESPNet p=2, q=8 (20 classes) at 1024×512, batch 1, float32, on the CPU: the plain eager model as
the authors run it, then each optimisation step of :mod:`wsi_espnet.fastpath`.  Rows that share a
process are timed interleaved call by call (A B C A B C …) so that a drift in the machine's speed
hits them alike.  Every row's output is compared with the eager model's with the weights exactly
as released.

    python benchmarks/bench_model.py                  # released weights when ../shared has them
    python benchmarks/bench_model.py --repeats 30 --threads 2
    python benchmarks/bench_model.py --no-compile     # skip torch.compile (10-80 s to compile)
    python benchmarks/bench_model.py --groups retain  # only the fastest rows

Rows ([group] = the process they run in):
  eager, as released [plain]     the authors' way: NCHW, torch.no_grad, the file's weights as stored
  eager [plain]                  the same from load_model, which zeroes the subnormal weights
  eager, NHWC [plain]            + channels_last, inference_mode
  folded, NCHW [plain]           batch norms folded, weights below 1e-20 stored as 0
  folded, NHWC [plain]           + channels_last: optimize_for_inference(model)
  eager, FTZ [ftz]               the CPU flushes subnormals to zero (torch.set_flush_denormal)
  eager, FTZ, NHWC [ftz]         + channels_last
  folded, NHWC (control) [ftz]   the same as in [plain], to compare the two processes
  folded, NHWC, retain [retain]  + freed memory kept: optimize_for_inference(model, retain_memory=True)
  compiled [retain]              + torch.compile, frozen weights (compile=True, retain_memory=True)

Flush-to-zero is per thread (OpenMP workers inherit it only when it is set before they start) and
the allocator setting is per process, so those groups each get a fresh process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsi_espnet.bench import max_relative_difference  # noqa: E402
from wsi_espnet.checkpoint import load_model  # noqa: E402
from wsi_espnet.espnet import build_model, count_parameters  # noqa: E402
from wsi_espnet.fastpath import optimize_for_inference, retain_freed_memory  # noqa: E402

RELEASED = Path(__file__).resolve().parents[2] / "shared" / "espnet-pretrained" / "decoder" / "espnet_p_2_q_8.pth"


def astronaut_input(height: int, width: int, model: torch.nn.Module) -> torch.Tensor:
    """A real photograph, normalised as the model's config says: real images give the activation
    statistics (and the subnormals) that random inputs do not."""
    from skimage.data import astronaut
    from skimage.transform import resize

    rgb = (resize(astronaut(), (height, width), order=1, anti_aliasing=True) * 255).round().astype(np.uint8)
    norm = model.config.normalization.apply(rgb) if hasattr(model, "config") else rgb.astype(np.float32) / 255
    return torch.from_numpy(np.ascontiguousarray(norm.transpose(2, 0, 1)))[None].float()


Row = tuple[Callable, torch.Tensor, int]  # (call, input, repeats)


def interleaved(rows: dict[str, Row], repeats: int) -> dict[str, list[tuple[float, float]]]:
    """(wall ms, process CPU ms) of each row's calls, the rows taking turns; a row with a smaller
    ``repeats`` of its own (the very slow plain eager) drops out after that many."""
    out: dict[str, list[tuple[float, float]]] = {k: [] for k in rows}
    for i in range(repeats):
        for name, (fn, x, n) in rows.items():
            if i >= n:
                continue
            c0, t0 = time.process_time(), time.perf_counter()
            fn(x)
            out[name].append(((time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3))
    return out


# Rows by process.  Flush-to-zero and glibc's allocator settings are per process (and FTZ is
# per thread: OpenMP workers inherit it only when it is set before they start), so each group runs
# in a fresh child with its setting made first; rows within a group are interleaved.
GROUPS = {
    "plain": ["eager, as released", "eager", "eager, NHWC", "folded, NCHW", "folded, NHWC"],
    "ftz": ["eager, FTZ", "eager, FTZ, NHWC", "folded, NHWC (control)"],
    "retain": ["folded, NHWC, retain", "compiled"],
}


def as_released(path: str) -> torch.nn.Module:
    """The file's weights exactly as stored, in eval mode: unlike ``load_model`` (which zeroes the
    released files' subnormal values since it learned of them), the authors' own code path."""
    from wsi_espnet.checkpoint import FORMAT, describe_state_dict

    obj = torch.load(path, map_location="cpu", weights_only=True)
    sd, arch = (obj["state_dict"], obj["arch"]) if obj.get("format") == FORMAT else (obj, describe_state_dict(obj))
    net = build_model(arch["variant"], arch["classes"], arch["p"], arch["q"], arch.get("skip", "level1"))
    net.load_state_dict(sd, strict=False)  # the released files predate num_batches_tracked
    return net.eval()


def child(args: argparse.Namespace) -> int:
    """Time one group of rows; print a JSON line of results."""
    import json

    if args.group == "ftz":
        torch.set_flush_denormal(True)  # before any parallel region, so every worker inherits it
    retained = retain_freed_memory() if args.group == "retain" else None
    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.lower().split("x"))
    if args.model:
        model, model_cl = load_model(args.model), load_model(args.model).to(memory_format=torch.channels_last)
        released = as_released(args.model)
    else:
        torch.manual_seed(0)
        model = build_model("espnet", 20, 2, 8).eval()
        model_cl = build_model("espnet", 20, 2, 8).eval()
        model_cl.load_state_dict(model.state_dict())
        model_cl = model_cl.to(memory_format=torch.channels_last)
        released = model
    x = astronaut_input(height, width, model)

    def run(net: torch.nn.Module, grad_off: type = torch.inference_mode, channels_last: bool = False) -> Callable:
        xx = x.contiguous(memory_format=torch.channels_last) if channels_last else x

        def fn(_: torch.Tensor) -> torch.Tensor:
            with grad_off():
                return net(xx)

        return fn

    makers: dict[str, Callable[[], Callable]] = {
        "eager, as released": lambda: run(released, torch.no_grad),
        "eager": lambda: run(model, torch.no_grad),
        "eager, NHWC": lambda: run(model_cl, channels_last=True),
        "eager, FTZ": lambda: run(model, torch.no_grad),
        "eager, FTZ, NHWC": lambda: run(model_cl, channels_last=True),
        "folded, NCHW": lambda: run(optimize_for_inference(model, channels_last=False)),
        "folded, NHWC": lambda: run(optimize_for_inference(model)),
        "folded, NHWC (control)": lambda: run(optimize_for_inference(model)),
        "folded, NHWC, retain": lambda: run(optimize_for_inference(model, retain_memory=True)),
        "compiled": lambda: run(
            optimize_for_inference(model, example_shape=tuple(x.shape), compile=True, retain_memory=True)
        ),
    }
    names = [n for n in GROUPS[args.group] if not (n == "compiled" and args.no_compile)]
    set_up = {}
    rows = {}
    for name in names:
        t0 = time.perf_counter()
        rows[name] = (makers[name](), x, args.eager_repeats if name == "eager, as released" else args.repeats)
        set_up[name] = time.perf_counter() - t0
    reference_path = Path(args.reference)
    if not reference_path.exists():  # the first group computes the logits of the weights as released
        with torch.no_grad():
            torch.save(released(x), reference_path)
    reference = torch.load(reference_path, weights_only=True)
    for fn, xx, _ in rows.values():  # warm-up
        fn(xx)
    results = interleaved(rows, args.repeats)
    diffs = {name: max_relative_difference(fn(xx), reference) for name, (fn, xx, _) in rows.items()}
    print(json.dumps({"results": results, "diffs": diffs, "set_up": set_up, "retained": retained}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(RELEASED) if RELEASED.exists() else None,
                    help="model file (default: the released p2q8 Cityscapes file if present, else random weights)")
    ap.add_argument("--size", default="1024x512", help="WIDTHxHEIGHT")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--eager-repeats", type=int, default=5, help="repeats of the (very slow) 'as released' row")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--groups", default=",".join(GROUPS), help="processes to run (default: all)")
    ap.add_argument("--group", choices=sorted(GROUPS), help=argparse.SUPPRESS)
    ap.add_argument("--reference", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.group:
        return child(args)

    import json
    import subprocess
    import tempfile

    groups = args.groups.split(",")
    if not set(groups) <= set(GROUPS):
        ap.error(f"--groups takes a comma-separated subset of {','.join(GROUPS)}")
    load = os.getloadavg()[0]
    weights = Path(args.model).name if args.model else "random weights"
    params = count_parameters(load_model(args.model) if args.model else build_model("espnet", 20, 2, 8))
    print(f"ESPNet p=2 q=8, {params:,} parameters ({weights}); input {args.size} (skimage astronaut), "
          f"batch 1, float32, "
          f"{args.threads} threads, torch {torch.__version__}; [group] = the process it ran in")
    print("\n| step | median ms | min ms | max ms | FPS (median) | CPU ms/frame | max rel. diff vs eager |")
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    set_up = {}
    with tempfile.TemporaryDirectory() as tmp:
        for group in groups:
            cmd = [sys.executable, __file__, "--group", group, "--reference", str(Path(tmp) / "reference.pt"),
                   "--size", args.size, "--threads", str(args.threads), "--repeats", str(args.repeats),
                   "--eager-repeats", str(args.eager_repeats)]
            cmd += ["--model", args.model] if args.model else []
            cmd += ["--no-compile"] if args.no_compile else []
            out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            set_up.update(out["set_up"])
            for name, samples in out["results"].items():
                wall = [w for w, _ in samples]
                cpu = [c for _, c in samples]
                med = statistics.median(wall)
                print(f"| {name} [{group}] | {med:.1f} | {min(wall):.1f} | {max(wall):.1f} | {1000 / med:.2f} | "
                      f"{statistics.median(cpu):.0f} | {out['diffs'][name]:.1e} |", flush=True)
    print(f"\nrepeats {args.repeats} ('as released' {args.eager_repeats}), interleaved within a group; load average "
          f"{load:.1f} at start, {os.getloadavg()[0]:.1f} at end (other work on the machine inflates wall times; "
          f"CPU ms/frame counts all threads, spin-waits included)")
    if "compiled" in set_up:
        print(f"torch.compile set-up (compile + first call): {set_up['compiled']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
