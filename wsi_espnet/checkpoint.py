"""Reading and writing model files.

Two kinds of file load: this project's checkpoints (a dict that carries the weights *and* everything
needed to use them: variant, p, q, classes with names and colours, normalisation, working
resolution), and the ESPNet authors' released files (a bare state dict; architecture read off the
tensor shapes, classes and normalisation from the matching config).  Both are read with
``torch.load(weights_only=True)``: a model file can never run code.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .config import DatasetConfig, config_from_dict, load_config
from .errors import ModelFileError
from .espnet import ESPNet, ESPNetC, Upsampled, build_model
from .fileid import file_sha256  # noqa: F401  (re-exported: part of the checkpoint API)
from .outputs import atomic_file

FORMAT = "wsi-espnet/1"
DEFAULT_MODEL = Path(__file__).resolve().parent / "weights" / "tissue_demo.pt"
RELEASED_CONFIG_BY_CLASSES = {20: "cityscapes", 12: "camvid"}


def _torch_load(path: Path) -> Any:
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelFileError(f"model path is a directory, not a file: {path}")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read it ({exc.strerror})") from None
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save's zip, or its legacy pickle
        raise ModelFileError(f"{path}: not a PyTorch model file (a model is a .pt/.pth of weights, or an .onnx "
                             "file with --backend onnxruntime)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            raise ModelFileError(f"{path}: refused to load: it holds Python objects beyond plain weights, and "
                                 "loading those could run code (save the model's state_dict instead)") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{path}: not a readable PyTorch model file ({first[:160]})") from None
    except Exception as exc:  # zip/pickle/EOF errors: not a torch file, or truncated
        raise ModelFileError(f"{path}: not a readable PyTorch model file ({type(exc).__name__}: {str(exc)[:120]})") from None


def _count_blocks(keys: list[str], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return len({m.group(1) for k in keys if (m := pat.match(k))})


def describe_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture of a released (or any bare) ESPNet state dict, read from its keys and shapes."""
    keys = list(sd)
    if any(k.startswith("encoder.") for k in keys):
        enc = "encoder."
        variant = "espnet"
    elif "level1.conv.weight" in sd:
        enc = ""
        variant = "espnet_c"
    else:
        raise ModelFileError("not an ESPNet state dict: no 'level1.conv.weight' or 'encoder.*' keys")
    w = sd.get(enc + "classifier.conv.weight")
    if w is None:
        raise ModelFileError(f"not an ESPNet state dict: missing '{enc}classifier.conv.weight'")
    classes = int(w.shape[0])
    arch = {
        "variant": variant,
        "classes": classes,
        "p": _count_blocks(keys, enc + "level2"),
        "q": _count_blocks(keys, enc + "level3"),
        "skip": "level1",
    }
    if variant == "espnet":
        if "conv.conv.weight" not in sd:
            raise ModelFileError("an ESPNet encoder ('encoder.*' keys) without the decoder's 'conv.conv.weight': "
                                 "save an ESPNet-C without the 'encoder.' prefix, or the whole ESPNet")
        width = int(sd["conv.conv.weight"].shape[1]) - classes
        skip = {v: k for k, v in ESPNet.SKIP_WIDTH.items()}.get(width)
        if skip is None:
            raise ModelFileError(f"decoder conv takes {width + classes} channels: expected classes + 16 or classes + 19")
        arch["skip"] = skip
    return arch


def _load_weights(model: nn.Module, sd: Mapping[str, torch.Tensor], where: str) -> None:
    """Strict load that reports *what* does not match, in one line."""
    own = model.state_dict()
    # Old files (the released ones among them) predate BatchNorm's num_batches_tracked counter.
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    problems = []
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[0]} (file vs model)")
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
    if problems:
        raise ModelFileError(f"{where}: weights do not fit the declared model: " + "; ".join(problems))
    model.load_state_dict(sd, strict=False)


def _finish(net: nn.Module, config: DatasetConfig, arch: dict[str, Any], source: str, meta: dict[str, Any]) -> nn.Module:
    model = Upsampled(net) if isinstance(net, ESPNetC) else net
    model.config = config  # type: ignore[attr-defined]
    model.arch = arch  # type: ignore[attr-defined]
    model.source = source  # type: ignore[attr-defined]
    model.meta = meta  # type: ignore[attr-defined]
    return model.eval()


def flush_subnormals_(module) -> int:
    """Zero the subnormal (denormal) values of ``module``'s float parameters and buffers, in place;
    returns how many there were.

    Why: the authors' released files hold tens of thousands of them (weights and batch-norm terms of
    channels that weight decay drove towards zero), and x86 CPUs handle subnormal arithmetic in
    microcode, tens of times slower.  Exported as they are, three small convolutions of
    ``level2.1`` took 40% of ONNX Runtime's time for a frame.  Values below 1.2e-38 contribute
    nothing a float32 logit can represent, so zeroing them changes no output.
    """
    import itertools

    import torch

    tiny = torch.finfo(torch.float32).tiny
    count = 0
    with torch.no_grad():
        for t in itertools.chain(module.parameters(), module.buffers()):
            if t.is_floating_point():
                sub = (t != 0) & (t.abs() < tiny)
                count += int(sub.sum())
                t.masked_fill_(sub, 0.0)
    return count


def load_model(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Load a model file and return it in eval mode, with ``.config`` (a :class:`DatasetConfig`),
    ``.arch`` and ``.meta`` attached.  The model always returns logits at input size (ESPNet-C
    output is upsampled bilinearly ×8, as the authors evaluate it).

    ``path=None`` loads the tissue model that ships with the package.  Subnormal weights are zeroed
    (:func:`flush_subnormals_`): the released files hold ~30k of them, which made eager inference
    ten times slower on x86 without changing any output.
    """
    p = Path(path) if path is not None else DEFAULT_MODEL
    obj = _torch_load(p)
    if not isinstance(obj, Mapping):
        raise ModelFileError(f"{p}: holds a {type(obj).__name__}, not a checkpoint dict or a state dict")
    if obj.get("format") == FORMAT:
        arch = dict(obj["arch"])
        config = config_from_dict(obj["config"], where=f"{p} (config)")
        if config.num_classes != arch["classes"]:
            raise ModelFileError(
                f"{p}: config lists {config.num_classes} classes but the model has {arch['classes']} outputs"
            )
        meta = {k: v for k, v in obj.items() if k not in ("state_dict", "config", "arch")}
        sd = obj["state_dict"]
    elif all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
        if sd and all(k.startswith("module.") for k in sd):  # saved from nn.DataParallel
            sd = {k[len("module."):]: v for k, v in sd.items()}
        try:
            arch = describe_state_dict(sd)
        except ModelFileError as exc:
            raise ModelFileError(f"{p}: {exc}") from None
        name = RELEASED_CONFIG_BY_CLASSES.get(arch["classes"])
        if name is None:
            raise ModelFileError(
                f"{p}: a bare state dict with {arch['classes']} classes; only the released Cityscapes (20) "
                "and CamVid (12) files carry no config: save your own models with wsi_espnet.save_checkpoint"
            )
        config = load_config(name)
        meta = {"released": True}
    else:
        raise ModelFileError(f"{p}: a dict, but neither a wsi-espnet checkpoint nor a state dict")
    net = build_model(arch["variant"], arch["classes"], arch["p"], arch["q"], arch.get("skip", "level1"))
    _load_weights(net, sd, str(p))
    flush_subnormals_(net)
    return _finish(net, config, arch, str(p), meta).to(device)


def architecture_of(model: nn.Module) -> dict[str, Any]:
    net = model.encoder if isinstance(model, Upsampled) else model
    if isinstance(net, ESPNet):
        return {"variant": "espnet", "classes": net.classes, "p": net.p, "q": net.q, "skip": net.skip}
    if isinstance(net, ESPNetC):
        return {"variant": "espnet_c", "classes": net.classes, "p": net.p, "q": net.q, "skip": "level1"}
    raise TypeError(f"not an ESPNet model: {type(model).__name__}")


def save_checkpoint(path: str | os.PathLike, model: nn.Module, config: DatasetConfig, **meta: Any) -> Path:
    """Write a self-describing checkpoint atomically (temporary file, then rename).  ``meta`` holds
    plain values only (numbers, strings, lists, dicts), so the file stays ``weights_only``-loadable."""
    net = model.encoder if isinstance(model, Upsampled) else model
    arch = architecture_of(net)
    if config.num_classes != arch["classes"]:
        raise ValueError(f"config has {config.num_classes} classes, model {arch['classes']}")
    payload = {
        "format": FORMAT,
        "arch": arch,
        "config": config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        **meta,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)
    return path
