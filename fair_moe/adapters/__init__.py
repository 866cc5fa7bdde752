"""Adapters registered by ``config.model_type``; ``get_adapter`` is the only way in."""

from __future__ import annotations

from fair_moe.adapters.base import FusedExpertsAdapter, MoELayer
from fair_moe.core.errors import FairMoeError

_REGISTRY: dict[str, FusedExpertsAdapter] = {}


def register_adapter(adapter: FusedExpertsAdapter) -> FusedExpertsAdapter:
    _REGISTRY[adapter.model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(config) -> FusedExpertsAdapter:
    """The adapter for ``config.model_type``; a FairMoeError naming the supported types otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise FairMoeError(
            f"model_type {model_type!r} is not supported; supported model types: {', '.join(supported_model_types())} "
            "(see `python -m fair_moe.prune --list-models`)"
        )
    return _REGISTRY[model_type]


# Families register themselves on import.
from fair_moe.adapters import families, qwen2_moe  # noqa: E402,F401

__all__ = ["FusedExpertsAdapter", "MoELayer", "get_adapter", "register_adapter", "supported_model_types"]
