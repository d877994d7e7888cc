"""flashsale API: the aiohttp application, the ``flashsale`` CLI and the demo."""

from api.app import create_app

__all__ = ["create_app"]
