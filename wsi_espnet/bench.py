"""``wsi-espnet bench``: parameters, multiply-adds, latency and throughput of a model.

Weights do not change the cost of a dense network, so by default the model is built with random
weights from ``--variant/--p/--q/--classes``; ``--model FILE`` times a real file instead (the
authors' released files are much slower in plain eager mode: they hold subnormal numbers, see
:mod:`wsi_espnet.fastpath`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import UserError

MODES = ("eager", "optimized", "both")


@dataclass(frozen=True)
class Timing:
    """Latencies of one mode, in milliseconds per call (one call = one batch)."""

    mode: str
    ms: tuple[float, ...]
    batch: int
    pixels: int  # per frame

    @property
    def median(self) -> float:
        return statistics.median(self.ms)

    @property
    def p90(self) -> float:
        s = sorted(self.ms)
        return s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]

    @property
    def fps(self) -> float:
        return self.batch * 1000.0 / self.median

    @property
    def megapixels_per_s(self) -> float:
        return self.fps * self.pixels / 1e6


def parse_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` (as images are usually described: 1024x512 is 1024 wide) to (H, W)."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UserError(f"--size must be WIDTHxHEIGHT, e.g. 1024x512, not {text!r}")
    w, h = (int(p) for p in parts)
    if w < 8 or h < 8:
        raise UserError(f"--size {text}: both sides must be at least 8 pixels")
    return h, w


def count_macs(model: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Multiply-adds per frame of one forward pass through ``model`` (its convolutions and
    deconvolutions, eager ones or the fast path's folded ones), and that pass's output.

    Forward hooks instead of ``FlopCounterMode`` on the meta device: the same numbers (tested), but
    the meta device's first use costs seconds and this runs during a call the benchmark makes anyway.
    """
    from .fastpath import FoldedConv

    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        w = module.weight
        transposed = isinstance(module, nn.ConvTranspose2d) or getattr(module, "transposed", False)
        # weight: (out, in/groups, kh, kw) for a conv, (in, out/groups, kh, kw) for a deconv; each
        # output (input, for a deconv) element takes w.shape[1]*kh*kw multiply-adds
        total += (inputs[0] if transposed else output).numel() * w.shape[1] * w.shape[2] * w.shape[3]

    kinds = (nn.Conv2d, nn.ConvTranspose2d, FoldedConv)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return total // x.shape[0], out


def time_calls(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Wall-clock milliseconds of ``repeats`` calls after ``warmup`` untimed ones."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def max_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|``: the tolerance the fast path is held to (1e-4)."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def _build(args: argparse.Namespace) -> nn.Module:
    if args.model:
        from .checkpoint import load_model

        return load_model(args.model)
    from .espnet import Upsampled, build_model

    if args.p < 0 or args.q < 0 or args.classes < 1:
        raise UserError("--p and --q must be >= 0 and --classes >= 1")
    torch.manual_seed(0)
    try:
        net = build_model(args.variant, args.classes, args.p, args.q, args.skip)
    except ValueError as exc:  # e.g. an ESPNet of fewer classes than its decoder's branches
        raise UserError(str(exc)) from None
    return (Upsampled(net) if args.variant == "espnet_c" else net).eval()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def _size_hint(model: nn.Module) -> str:
    from .espnet import ESPNet

    return " (ESPNet's decoder needs both sides divisible by 8)" if isinstance(model, ESPNet) else ""


def _device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but this PyTorch has no CUDA device")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"unknown device {name!r}: use cpu or cuda")
    return torch.device(name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("model (default: ESPNet p=2 q=8, 20 classes, random weights)")
    src.add_argument("--model", help="a model file (wsi-espnet checkpoint or a released .pth)")
    src.add_argument("--variant", choices=("espnet", "espnet_c"), default="espnet")
    src.add_argument("--p", type=int, default=2, help="ESP modules at 1/4 size (default 2)")
    src.add_argument("--q", type=int, default=8, help="ESP modules at 1/8 size (default 8)")
    src.add_argument("--classes", type=int, default=20)
    src.add_argument("--skip", choices=("level1", "level1_reinforced"), default="level1", help="decoder skip input")
    parser.add_argument("--size", default="1024x512", help="input WIDTHxHEIGHT (default 1024x512)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's, one per core)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per mode (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    parser.add_argument("--mode", choices=MODES, default="both", help="eager, optimized or both (default)")
    parser.add_argument("--compile", action="store_true", help="optimized mode also uses torch.compile (slow start)")


def run(args: argparse.Namespace) -> int:
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        raise UserError("--batch and --repeats must be >= 1, --warmup >= 0")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    h, w = parse_size(args.size)
    device = _device(args.device)
    model = _build(args).to(device)
    shape = (args.batch, 3, h, w)
    params = sum(t.numel() for t in model.parameters())
    tiny = torch.finfo(torch.float32).tiny
    floats = [t for t in model.state_dict().values() if t.is_floating_point()]
    subnormal = sum(int(((t != 0) & (t.abs() < tiny)).sum()) for t in floats)
    x = torch.randn(shape, device=device)

    from .fastpath import optimize_for_inference

    # The folded twin is cheap to build and fast to run: it checks the size and counts the work.
    try:
        with torch.inference_mode():
            macs, _ = count_macs(optimize_for_inference(model), x[:1])
    except RuntimeError as exc:
        raise UserError(f"the model does not take a {w}x{h} input{_size_hint(model)}: {_first_line(exc)}") from None
    candidates: dict[str, nn.Module] = {}
    if args.mode in ("eager", "both"):
        candidates["eager"] = model
    started = time.perf_counter()
    if args.mode in ("optimized", "both"):
        # this process only runs the benchmark: the optimized path keeps freed memory (see fastpath)
        candidates["optimized"] = optimize_for_inference(
            model, example_shape=shape, compile=args.compile, retain_memory=device.type == "cpu"
        )
    setup_s = time.perf_counter() - started

    timings, outputs = [], {}
    with torch.inference_mode():
        for name, net in candidates.items():
            outputs[name] = net(x)
            ms = time_calls(lambda: net(x), args.repeats, args.warmup, device)
            timings.append(Timing(name, tuple(ms), args.batch, h * w))

    name = args.model or f"{args.variant} p={args.p} q={args.q} classes={args.classes} (random weights)"
    print(f"model        {name}")
    print(f"input        {args.batch}x3x{h}x{w} float32 on {device} ({torch.get_num_threads()} threads)")
    print(f"parameters   {params:,}")
    if subnormal:
        print(f"note         {subnormal:,} parameters are subnormal (< 1.2e-38): they slow eager mode down "
              "(the optimized model stores them as 0)")
    print(f"multiply-add {macs / 1e9:.3f} G per frame ({2 * macs / 1e9:.3f} GFLOPs, convolutions)")
    if "optimized" in candidates:
        print(f"optimize     {setup_s:.2f} s set-up" + (" (torch.compile)" if args.compile else ""))
    print()
    print(f"{'mode':<10} {'median ms':>10} {'p90 ms':>9} {'min ms':>9} {'frames/s':>9} {'Mpixel/s':>9}")
    for t in timings:
        print(f"{t.mode:<10} {t.median:>10.1f} {t.p90:>9.1f} {min(t.ms):>9.1f} {t.fps:>9.2f} "
              f"{t.megapixels_per_s:>9.2f}")
    if len(outputs) == 2:
        diff = max_relative_difference(outputs["optimized"], outputs["eager"])
        print(f"\nmax |optimized - eager| / max |eager| = {diff:.2e} (tolerance 1e-4)")
    return 0
