"""The HTTP interface of flashsale: the aiohttp application and its views."""
