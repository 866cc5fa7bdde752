"""A name → strategy table: each strategy is registered once, under the name the command line uses.

Choices in ``--help``, ``auto``'s candidates, the model card text and the docs are all read from the
registries (``fair_moe.strategies``, ``fair_moe.units``), never from hand-written lists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar

from fair_moe.core.errors import FairMoeError


class Named(Protocol):
    name: str
    description: str


T = TypeVar("T", bound=Named)


class Registry(Generic[T]):
    """Strategies of one kind, in registration order. ``flag`` is the CLI flag that picks one."""

    def __init__(self, kind: str, flag: str):
        self.kind = kind
        self.flag = flag
        self._items: dict[str, T] = {}

    def register(self, item: T) -> T:
        """Add ``item`` under ``item.name``; usable as a class decorator (the class is instantiated once)."""
        instance = item() if isinstance(item, type) else item
        if instance.name in self._items:
            raise ValueError(f"{self.kind} {instance.name!r} is registered twice")
        self._items[instance.name] = instance
        return item

    def get(self, name: str) -> T:
        if name not in self._items:
            raise FairMoeError(f"{self.flag} {name!r} is unknown: use one of {', '.join(self._items)}")
        return self._items[name]

    def names(self, where: Callable[[T], bool] | None = None) -> list[str]:
        return [name for name, item in self._items.items() if where is None or where(item)]

    def __iter__(self) -> Iterator[T]:
        return iter(self._items.values())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def help(self) -> str:
        """One ``name: description`` line per entry, for ``--help``."""
        return "; ".join(f"{item.name}: {item.description}" for item in self)
