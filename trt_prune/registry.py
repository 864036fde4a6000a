"""One registry type for every table of named extensions: channel rules, surgery, importances, clean passes,
backends, built-in models.

The duplicate policy is the same everywhere: registering a key that already holds *another* object is an
error unless the caller says ``replace=True`` (an explicit override of a built-in, e.g. a user's own channel
rule for an op); registering the same object again is a no-op (a module imported twice). An unknown key is a
:class:`~trt_prune.errors.TrtPruneError` subclass chosen by the registry's owner, listing the valid keys.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Generic, TypeVar

from trt_prune.errors import TrtPruneError

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class RegistryError(TypeError):
    """A programming error while registering (a duplicate key without ``replace=True``, an empty key)."""


class Registry(Mapping[K, V], Generic[K, V]):
    """A read-only mapping filled through :meth:`register` / :meth:`decorator`.

    ``kind`` names what it holds in messages ("channel rule", "backend"); ``error`` is raised by :meth:`get`
    for an unknown key; ``describe`` turns a key into text for messages (default ``str``).
    """

    def __init__(self, kind: str, error: type[TrtPruneError] = TrtPruneError,
                 describe: Callable[[K], str] = str) -> None:
        self.kind = kind
        self.error = error
        self._describe = describe
        self._items: dict[K, V] = {}

    # Mapping protocol ------------------------------------------------------------------------------------
    def __getitem__(self, key: K) -> V:
        return self._items[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries)"

    # filling -----------------------------------------------------------------------------------------------
    def register(self, key: K, value: V, *, replace: bool = False) -> V:
        """Put ``value`` under ``key``; see the module docstring for the duplicate policy."""
        if key is None or key == "":
            raise RegistryError(f"a {self.kind} needs a non-empty key, got {key!r}")
        held = self._items.get(key)
        if held is not None and held is not value and not replace:
            raise RegistryError(f"{self.kind} {self._describe(key)!r} is already registered "
                                f"({_label(held)}); pass replace=True to override it with {_label(value)}")
        self._items[key] = value
        return value

    def decorator(self, *keys: K, replace: bool = False) -> Callable[[V], V]:
        """``@registry.decorator(key, ...)``: register the decorated object under every key."""
        if not keys:
            raise RegistryError(f"registering a {self.kind} needs at least one key")

        def deco(value: V) -> V:
            for key in keys:
                self.register(key, value, replace=replace)
            return value

        return deco

    def unregister(self, key: K) -> None:
        """Remove ``key`` (tests and user overrides that clean up after themselves)."""
        self._items.pop(key, None)

    # lookup ------------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every key as text, sorted."""
        return sorted(self._describe(k) for k in self._items)

    def get(self, key: K, default: V | None = None) -> V | None:  # type: ignore[override]
        """Mapping-style lookup: ``default`` when ``key`` is missing."""
        return self._items.get(key, default)

    def lookup(self, key: K) -> V:
        """The value under ``key``; an unknown key raises ``self.error`` naming the valid ones."""
        try:
            return self._items[key]
        except (KeyError, TypeError):
            raise self.error(f"unknown {self.kind} {key!r}; valid names: {', '.join(self.names())}") from None


def _label(obj: object) -> str:
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    module = getattr(obj, "__module__", None)
    return f"{module}.{name}" if module else str(name)
