"""How to build a model: ``timm:NAME`` / ``torchvision:NAME`` specs, weights files, data configs.

A :class:`SourceSpec` is the recipe to build an architecture (library, name, constructor kwargs). It
is stored in every checkpoint so :func:`gnsurgeon.load` can rebuild the model offline; weights never
come from the network at load time (the tensors are in the checkpoint). This is the leaf that
:mod:`gnsurgeon.checkpoint` rebuilds models with; opening a *source* (a name or a checkpoint, plus
the command's source options) is :mod:`gnsurgeon.sources`, one level up.

Stage: model construction, below checkpoints. It imports: errors (timm and torchvision inside the
builders, so that naming one library does not load the other).
"""

from __future__ import annotations

import contextlib
import inspect as pyinspect
import re
import socket
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import GNSurgeonError, first_line

LIBRARIES = ("timm", "torchvision")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # terminal colour codes in library messages


@dataclass
class SourceSpec:
    """How to build an architecture: ``library:name`` plus constructor kwargs."""

    library: str
    name: str
    kwargs: dict = field(default_factory=dict)
    pretrained: bool = False

    def __str__(self) -> str:
        return f"{self.library}:{self.name}"

    @classmethod
    def parse(cls, text: str, kwargs: dict | None = None, pretrained: bool = False) -> SourceSpec:
        library, sep, name = text.partition(":")
        if not sep or library not in LIBRARIES or not name:
            raise GNSurgeonError(f"source {text!r} is not timm:NAME, torchvision:NAME or a gnsurgeon checkpoint file")
        return cls(library, name, dict(kwargs or {}), pretrained)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SourceSpec:
        return cls(data["library"], data["name"], dict(data.get("kwargs", {})), bool(data.get("pretrained")))


@dataclass
class DataConfig:
    """What the model eats: input size (C, H, W) or (C, T, H, W) for video, normalisation, task."""

    input_size: tuple[int, ...] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    task: str = "classification"  # classification | segmentation | detection | video

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DataConfig:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        for key in ("input_size", "mean", "std"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


def _torchvision_builder(name: str):
    import torchvision.models as tvm

    if name not in tvm.list_models():
        raise GNSurgeonError(f"unknown torchvision model {name!r} (see torchvision.models.list_models())")
    return tvm.get_model_builder(name)


def _torchvision_task(name: str) -> str:
    module = _torchvision_builder(name).__module__
    for task in ("detection", "segmentation", "video", "optical_flow", "quantization"):
        if f".{task}" in module:
            return task
    return "classification"


def _check_timm_name(name: str) -> None:
    import timm

    base = name.split(".")[0]
    if not timm.is_model(base):
        raise GNSurgeonError(f"unknown timm model {base!r} (see timm.list_models())")


def build_model(spec: SourceSpec, *, pretrained: bool | None = None) -> nn.Module:
    """Construct the architecture; ``pretrained`` overrides ``spec.pretrained`` (load() passes False)."""
    use_pretrained = spec.pretrained if pretrained is None else pretrained
    kwargs = dict(spec.kwargs)
    try:
        if spec.library == "timm":
            import timm

            _check_timm_name(spec.name)
            with hub_offline_unless_reachable(use_pretrained):
                return timm.create_model(spec.name, pretrained=use_pretrained, **kwargs)
        builder = _torchvision_builder(spec.name)
        params = pyinspect.signature(builder).parameters
        kwargs.setdefault("weights", "DEFAULT" if use_pretrained else None)
        # Detection/segmentation builders fetch backbone weights by default: only when asked.
        if "weights_backbone" in params and not use_pretrained:
            kwargs.setdefault("weights_backbone", None)
        return builder(**kwargs)
    except GNSurgeonError:
        raise
    except (OSError, RuntimeError) as exc:  # network failures surface as OSError/URLError/HF errors
        if use_pretrained and _looks_offline(exc):
            raise GNSurgeonError(
                f"could not fetch pretrained weights for {spec} (offline, or not in the local cache); "
                "download them on a connected machine and pass --weights FILE"
            ) from None
        raise GNSurgeonError(f"could not build {spec} with {kwargs}: {first_line(exc)}") from None
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        raise GNSurgeonError(f"could not build {spec} with {kwargs}: {first_line(exc)}") from None


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def hub_offline_unless_reachable(pretrained: bool):
    """While timm fetches pretrained weights: if the Hugging Face Hub cannot be reached (one TCP
    connect, at most 3 s), switch huggingface_hub to offline mode so that cached weights still load
    and missing ones fail at once. Without it, an offline ``--pretrained`` spent ~52 s printing
    "Retrying in 8s" (the hub's HEAD request backs off five times) before failing the same way."""
    try:
        from huggingface_hub import constants as hub
    except ImportError:  # timm without the hub: its own download fails fast
        hub = None
    if not pretrained or hub is None or hub.HF_HUB_OFFLINE or _reachable(hub.ENDPOINT):
        yield
        return
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = False


def _looks_offline(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, OSError) or any(
        s in text for s in ("connection", "urlopen", "offline", "resolve", "hub", "network")
    )


def _with_channels(config: DataConfig, in_chans) -> DataConfig:
    """timm's data config says 3 channels whatever ``in_chans`` the model was built with, so probes
    of an ``--in-chans 1`` model failed; take the model's channels, mean/std averaged over RGB."""
    if not isinstance(in_chans, int) or isinstance(in_chans, bool) or in_chans < 1 or in_chans == config.input_size[0]:
        return config
    config.input_size = (in_chans, *config.input_size[1:])
    if len(config.mean) != in_chans:
        config.mean = (sum(config.mean) / len(config.mean),) * in_chans
        config.std = (sum(config.std) / len(config.std),) * in_chans
    return config


def data_config_for(spec: SourceSpec, model: nn.Module) -> DataConfig:
    """The model's own data config: timm's pretrained_cfg, or torchvision's weights transforms."""
    if spec.library == "timm":
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        config = DataConfig(
            input_size=tuple(int(v) for v in cfg["input_size"]),
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
            interpolation=str(cfg.get("interpolation", "bilinear")),
            crop_pct=float(cfg.get("crop_pct", 0.875)),
        )
        return _with_channels(config, spec.kwargs.get("in_chans"))
    import torchvision.models as tvm

    task = _torchvision_task(spec.name)
    config = DataConfig(task=task)
    try:
        transforms = tvm.get_model_weights(spec.name).DEFAULT.transforms()
    except (ValueError, AttributeError, TypeError):
        transforms = None
    if transforms is not None:
        config.mean = tuple(float(v) for v in getattr(transforms, "mean", IMAGENET_MEAN))
        config.std = tuple(float(v) for v in getattr(transforms, "std", IMAGENET_STD))
        interp = getattr(transforms, "interpolation", None)
        config.interpolation = getattr(interp, "value", "bilinear") if interp is not None else "bilinear"
        crop = getattr(transforms, "crop_size", None) or getattr(transforms, "resize_size", None)
        resize = getattr(transforms, "resize_size", None)
        if crop:
            side = int(crop[0])
            config.input_size = (3, 16, side, side) if task == "video" else (3, side, side)
            if resize and getattr(transforms, "crop_size", None):
                config.crop_pct = round(side / min(resize), 4)
    if task == "video" and len(config.input_size) == 3:
        config.input_size = (3, 16, 112, 112)
    if task == "detection":
        # Detection models resize internally; a modest canvas keeps probes cheap.
        config.input_size = (3, 320, 320)
    return config


# ----------------------------------------------------------------------------------------- weights
_NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file: ``.safetensors`` or a ``torch.save`` state dict (safe loading only)."""
    path = Path(path)
    if not path.is_file():
        raise GNSurgeonError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise GNSurgeonError(
                f"cannot read weights file {path}: not a valid safetensors file ({first_line(exc)})"
            ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip archives, unsafe globals...
        raise GNSurgeonError(_unreadable_weights(path, exc)) from None
    return _unwrap_state_dict(obj, path)


def _first_pickled_class(path: Path) -> str | None:
    """The first class the checkpoint's pickle names: the saved object's own class (the model for
    ``torch.save(model)``). Read from the opcodes with :mod:`pickletools`; nothing is unpickled."""
    import pickletools
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            data = next(n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl")
            strings: list[str] = []
            for op, arg, _ in pickletools.genops(archive.read(data)):
                if op.name == "GLOBAL":
                    return str(arg).replace(" ", ".")
                if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    return f"{strings[-2]}.{strings[-1]}"
                if isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # not a zip checkpoint, truncated: fall back to torch's list
        return None
    return None


def _unreadable_weights(path: Path, exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused ``path``, in one sentence.

    The pickle's classes are listed without running anything (torch's own opcode scan): a whole
    pickled model (``torch.save(model)``, the commonest mistake) names its module classes, and the
    fix is to save ``model.state_dict()``; torch's own message is a page of advice with ANSI codes.
    """
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # not a zip checkpoint, truncated: nothing to list
        names = []
    if any(n.startswith("torch.nn.modules.") for n in names):
        first = _first_pickled_class(path)  # torch lists the classes as an unordered set
        top = first if first in names else next((n for n in names if not n.startswith("torch.nn.modules.")), names[0])
        return (
            f"weights file {path} holds a pickled model ({top}), not a state dict: save `model.state_dict()` "
            "and pass that file (gnsurgeon never runs pickled code)"
        )
    if names:
        return (
            f"weights file {path} holds pickled Python objects ({', '.join(names[:3])}), not only tensors; "
            "gnsurgeon never runs pickled code: save a dict of tensors (a state dict)"
        )
    reason = _ANSI.sub("", first_line(exc))
    return f"cannot read weights file {path}: corrupt, truncated or not a PyTorch state dict ({reason})"


def _unwrap_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        nested = next((obj[k] for k in _NESTED_KEYS if isinstance(obj, dict) and k in obj), None)
        if nested is None:
            break
        obj = nested
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise GNSurgeonError(
            f"weights file {path} holds no state dict (looked at the top level and under {_NESTED_KEYS})"
        )
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel/DDP
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


# Auxiliary heads that torchvision builds only when asked: constructor option -> their key prefixes.
_AUX_HEADS = {
    "aux_loss": ("aux_classifier.",),  # fcn_*, deeplabv3_*
    "aux_logits": ("aux1.", "aux2.", "AuxLogits."),  # googlenet, inception_v3
}


def _aux_hint(missing: list[str], unexpected: list[str]) -> str:
    """Where the mismatch is exactly an auxiliary head, the constructor option that adds or drops it."""
    for option, prefixes in _AUX_HEADS.items():
        if unexpected and not missing and all(k.startswith(prefixes) for k in unexpected):
            return f" (the file has an auxiliary head: build the model with --model-kwargs {option}=True)"
        if missing and not unexpected and all(k.startswith(prefixes) for k in missing):
            return f" (the model has an auxiliary head the file lacks: build it with --model-kwargs {option}=False)"
    return ""


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _preview(keys: list[str], n: int = 4) -> str:
    more = f", ... {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load all of ``state`` into ``model`` or explain precisely why not.

    BatchNorm's ``num_batches_tracked`` counters are bookkeeping, not weights: they may be absent
    (FrozenBatchNorm checkpoints, detection weights) or extra without failing the load.
    """
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not _is_counter(k))
    unexpected = sorted(k for k in state if k not in own and not _is_counter(k))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) ({_preview(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) ({_preview(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es) ({_preview(shapes, 3)})")
        raise GNSurgeonError(f"{origin} does not fit the model: " + "; ".join(parts) + _aux_hint(missing, unexpected))
    filtered = {k: v for k, v in state.items() if k in own}
    model.load_state_dict(filtered, strict=False)
