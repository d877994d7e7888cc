"""flashsale API: the aiohttp application, the ``flashsale`` CLI and the demo."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from api.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `python -m api.loadgen` does not import the whole server stack.
    if name == "create_app":
        from api.app import create_app

        return create_app
    raise AttributeError(name)
