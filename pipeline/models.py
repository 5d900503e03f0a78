"""PyTorch models: the built-in digits CNN, torchvision architectures, and user factories.

Only `prepare`, `export` and `validate` import this module (they need torch); the
GPU-side stages never do."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from .config import ModelConfig
from .errors import ConfigError, ModelError, PipelineError
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
    factory = _resolve_factory(cfg.arch)
    try:
        model = factory()
    except PipelineError:
        raise
    except Exception as e:  # the user's factory raised
        raise ConfigError(f"model.arch '{cfg.arch}' raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}; "
                          "fix the model factory") from None
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model.arch '{cfg.arch}' returned {type(model).__name__}, not a torch.nn.Module; "
                          "the factory must return the model")
    return model


# -- outputs ----------------------------------------------------------------------------------
def flatten_outputs(out: Any, path: str = "") -> list[tuple[str, Any]]:
    """A model's return value as (name, tensor) pairs in a fixed order: a tensor, or tuples,
    lists, dicts and HuggingFace ModelOutputs of them (nested). Names come from dict keys,
    else from positions (`0`, `1.boxes`)."""
    import torch

    if isinstance(out, torch.Tensor):
        return [(path or "output", out)]
    if out is None:
        return []
    if hasattr(out, "to_tuple") and hasattr(out, "keys"):  # transformers.utils.ModelOutput
        out = {k: out[k] for k in out.keys()}
    if isinstance(out, dict):
        items = [(str(k), v) for k, v in out.items()]
    elif isinstance(out, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(out)]
    else:
        raise ModelError(f"the model returned {type(out).__name__}{f' at {path!r}' if path else ''}; outputs must be "
                         "tensors, or tuples, lists or dicts of them")
    flat: list[tuple[str, Any]] = []
    for k, v in items:
        flat += flatten_outputs(v, f"{path}.{k}" if path else k)
    return flat


def output_names(flat: list[tuple[str, Any]], configured: Optional[list[str]], structure: str) -> list[str]:
    """The names export gives the flattened outputs: the config's, or derived from the structure."""
    if configured is not None:
        if len(configured) != len(flat):
            raise ConfigError(f"model.outputs names {len(configured)} output(s) ({', '.join(configured)}), but the model "
                              f"returns {len(flat)}: {structure}; give one name per returned tensor, in that order")
        return list(configured)
    if len(flat) == 1:
        return ["logits" if flat[0][0] == "output" else flat[0][0].replace(".", "_")]
    names = [n if not n[0].isdigit() else f"output_{n}" for n, _ in flat]
    return [n.replace(".", "_") for n in names]


def describe_structure(out: Any) -> str:
    flat = flatten_outputs(out)
    kind = type(out).__name__
    return f"{kind} of {len(flat)} tensor(s): " + ", ".join(f"{n} {list(t.shape)}" for n, t in flat)


class FlatOutputs:
    """Wraps a model so forward() returns its outputs flattened into a tuple (for export)."""

    def __new__(cls, model: Any) -> Any:
        import torch

        class _Flat(torch.nn.Module):
            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, *args: Any) -> Any:
                return tuple(t for _, t in flatten_outputs(self.inner(*args)))

        return _Flat(model)


def run_flat(model: Any, inputs: list[Any]) -> list[Any]:
    """The model's outputs on `inputs` (positional), flattened."""
    return [t for _, t in flatten_outputs(model(*inputs))]


def load_checkpoint(model: Any, path: str | Path) -> Any:
    """Load a state dict with `torch.load(weights_only=True)` (no pickled code runs)."""
    import torch

    path = Path(path)
    from .fileio import not_a_folder

    not_a_folder(path, "a checkpoint (model.checkpoint)", ModelError)
    if not path.is_file():
        raise ModelError(f"{path}: checkpoint not found; set model.checkpoint to an existing .pt/.pth file")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save: a zip, or a legacy pickle
        raise ModelError(f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive; this file starts with "
                         f"{head!r}); point model.checkpoint at a state_dict saved with torch.save(model.state_dict(), path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if isinstance(e, (KeyError, EOFError)) or "magic number" in why or "zip" in why.lower():
            why = "not a PyTorch checkpoint (torch.save output): truncated, or another kind of file"
        raise ModelError(f"{path}: cannot load checkpoint with weights_only=True ({why}); point model.checkpoint at "
                         "a state_dict saved with torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state_dict (mapping of parameter names to tensors), got {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelError(f"{path}: entry {bad[0]!r} is not a named tensor; expected a state_dict "
                         "(torch.save(model.state_dict(), path))")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ModelError(f"{path}: checkpoint does not fit model.arch ({' '.join(first[:2])})") from None
    return model
