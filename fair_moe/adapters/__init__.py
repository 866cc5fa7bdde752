"""Adapters by ``config.model_type``; ``get_adapter`` is the only way in.

Every model type is served by structure (``adapters/structure.py``): its MoE blocks are found on the model.
``families.py`` registers only what the module tree cannot say about a family (a checkpoint key format, a
reason it cannot be pruned). ``SUPPORTED`` lists the types the test matrix covers (``scripts/coverage.py``).
"""

from __future__ import annotations

from fair_moe.adapters.base import FusedExpertsAdapter, MoELayer
from fair_moe.adapters.structure import Unsupported

_REGISTRY: dict[str, FusedExpertsAdapter] = {}
_GENERIC: dict[str, FusedExpertsAdapter] = {}


def register_adapter(adapter: FusedExpertsAdapter) -> FusedExpertsAdapter:
    _REGISTRY[adapter.model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    """The model types every test of the fused-experts matrix passes on (``--list-models``)."""
    from fair_moe.adapters.families import SUPPORTED

    return sorted(SUPPORTED)


def get_adapter(config) -> FusedExpertsAdapter:
    """The adapter for ``config.model_type``: the family's own rules where it has any, else found by structure.
    A model that is not a fused-experts MoE fair_moe can prune is refused when its structure is asked for, with
    what was looked for."""
    model_type = getattr(config, "model_type", None)
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    return _GENERIC.setdefault(model_type, FusedExpertsAdapter(model_type=model_type))


# Families register their rules on import.
from fair_moe.adapters import families  # noqa: E402,F401

__all__ = ["FusedExpertsAdapter", "MoELayer", "Unsupported", "get_adapter", "register_adapter",
           "supported_model_types"]
