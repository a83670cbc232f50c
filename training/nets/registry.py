"""Name -> network builder registry, in the spirit of timm's ``@register_model``.

Every network is built by ``get_model(name, num_classes=..., input_size=..., **options)`` so the
CLI, experiments and export can all refer to networks by name and record that name in MLflow.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_TASKS: dict[str, str] = {}


def register_model(task: str = "classify"):
    """Register ``fn`` under its own name for ``task`` ('classify' or 'dehaze')."""

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if fn.__name__ in _REGISTRY:
            raise ValueError(f"network {fn.__name__!r} registered twice")
        _REGISTRY[fn.__name__] = fn
        _TASKS[fn.__name__] = task
        return fn

    return decorator


def list_models(task: str | None = None) -> list[str]:
    return sorted(n for n in _REGISTRY if task is None or _TASKS[n] == task)


def model_task(name: str) -> str:
    _check_name(name)
    return _TASKS[name]


def model_options(name: str) -> dict[str, object]:
    """The keyword options a network accepts, with their defaults (for help text and MLflow)."""
    _check_name(name)
    params = inspect.signature(_REGISTRY[name]).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def get_model(name: str, **options) -> nn.Module:
    _check_name(name)
    unknown = set(options) - set(model_options(name))
    if unknown:
        raise ValueError(f"network {name!r} has no option(s) {sorted(unknown)}; it takes {sorted(model_options(name))}")
    return _REGISTRY[name](**options)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        raise ValueError(f"unknown network {name!r}; registered: {', '.join(list_models())}")
