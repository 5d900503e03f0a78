"""PyTorch models: the built-in digits CNN, torchvision architectures, and user factories.

Only `prepare`, `export` and `validate` import this module (they need torch); the
GPU-side stages never do."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .config import ModelConfig
from .errors import ConfigError, ModelError
from .plugins import load_callable


def digits_cnn(num_classes: int = 10) -> Any:
    """A small CNN for 1x8x8 digits: two conv blocks, global structure kept, ~20k parameters."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


BUILTINS: dict[str, Callable[..., Any]] = {"digits_cnn": digits_cnn}


def _resolve_factory(spec: str) -> Callable[..., Any]:
    return load_callable(spec, "model.arch", ConfigError)


def build_model(cfg: ModelConfig) -> Any:
    """Instantiate the architecture (no weights loaded yet)."""
    if cfg.source == "builtin":
        if cfg.arch not in BUILTINS:
            raise ConfigError(f"model.arch '{cfg.arch}': unknown builtin; choose one of {sorted(BUILTINS)}")
        return BUILTINS[cfg.arch](num_classes=cfg.num_classes)
    if cfg.source == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model(cfg.arch, weights=None, num_classes=cfg.num_classes)
        except ValueError:
            raise ConfigError(
                f"model.arch '{cfg.arch}': not a torchvision model; see torchvision.models.list_models()"
            ) from None
    return _resolve_factory(cfg.arch)()


def load_checkpoint(model: Any, path: str | Path) -> Any:
    """Load a state dict with `torch.load(weights_only=True)` (no pickled code runs)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found; set model.checkpoint to an existing .pt/.pth file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"{path}: cannot load checkpoint with weights_only=True ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state_dict (mapping of parameter names to tensors), got {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ModelError(f"{path}: checkpoint does not fit model.arch ({' '.join(first[:2])})") from None
    return model
