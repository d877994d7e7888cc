"""flashsale core, the domain code every other package builds on.

Import from the modules themselves (nothing is re-exported here): ``core.settings``
(Settings), ``core.events`` (the events and their codec), ``core.keys`` (Redis key names),
``core.models`` (views), ``core.errors`` (one root, narrow subclasses), ``core.gateway``
(the Redis gateway and its Lua scripts in ``core/lua``), ``core.durability`` and
``core.logs``.
"""

__all__: list[str] = []
