"""Close everything a test opened: :func:`closing_all` wraps a factory and closes its products."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import ParamSpec, Protocol, TypeVar


class Closeable(Protocol):
    """Anything with a ``close()`` method (backends, block stores)."""

    def close(self) -> None:
        """Release the object's resources."""


P = ParamSpec("P")
C = TypeVar("C", bound=Closeable)


@contextlib.contextmanager
def closing_all(factory: Callable[P, C]) -> Iterator[Callable[P, C]]:
    """Yield ``factory`` wrapped so that every object it returns is closed on exit, oldest first."""
    opened: list[C] = []

    def make(*args: P.args, **kwargs: P.kwargs) -> C:
        obj = factory(*args, **kwargs)
        opened.append(obj)
        return obj

    try:
        yield make
    finally:
        for obj in opened:
            obj.close()
