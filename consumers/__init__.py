"""flashsale consumers: the consumer-group daemon that projects the event streams, the
dead-letter stream, stream retention, reservation pruning, expiry, the periodic loop they
share and consumer health.

Nothing is re-exported: callers import from the module that defines a name.
"""

__all__: list[str] = []
