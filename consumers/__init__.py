"""flashsale consumers: the consumer-group daemons that project the event streams."""

from consumers.projector import Delivery, Projector

__all__ = ["Delivery", "Projector"]
