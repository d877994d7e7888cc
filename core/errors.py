"""The exception hierarchy; the HTTP layer maps these to problem responses."""

from __future__ import annotations


class FlashsaleError(Exception):
    """Root of every error raised by flashsale."""

    code = "error"


class ConfigurationError(FlashsaleError):
    """The service is not configured well enough to run (a missing or bad setting)."""

    code = "configuration"


class DurabilityError(ConfigurationError):
    """Redis does not persist writes the way ``FLASHSALE_DURABILITY`` asks for."""

    code = "durability"


class RejectedError(FlashsaleError):
    """A request was refused by a business rule; nothing changed."""


class SaleNotFound(RejectedError):
    """No sale has this id."""

    code = "sale_not_found"


class SaleExists(RejectedError):
    """A sale with this id already exists."""

    code = "sale_exists"


class SaleNotActive(RejectedError):
    """The sale has not started yet, has ended or was closed."""

    code = "sale_not_active"


class SoldOut(RejectedError):
    """Not enough stock remains for this quantity."""

    code = "sold_out"


class LimitReached(RejectedError):
    """The buyer would exceed the sale's per-user limit."""

    code = "limit_reached"


class ReservationNotFound(RejectedError):
    """No reservation has this id (or it belongs to someone else)."""

    code = "reservation_not_found"


class ReservationPastDeadline(RejectedError):
    """The reservation's payment window has passed; its stock went back on sale."""

    code = "reservation_expired"


class ReservationClosed(RejectedError):
    """The reservation is already confirmed or cancelled and cannot change any more."""

    code = "reservation_closed"


class NotEnoughUnsoldStock(RejectedError):
    """A withdrawal asked for more stock than remains unsold."""

    code = "not_enough_unsold_stock"


class IdempotencyKeyReused(RejectedError):
    """This Idempotency-Key was already used for a different request."""

    code = "idempotency_key_reused"


class InfrastructureError(FlashsaleError):
    """Redis or PostgreSQL failed or answered something unexpected."""

    code = "unavailable"


class NotReplicated(InfrastructureError):
    """Fewer replicas than ``FLASHSALE_WAIT_REPLICAS`` acknowledged a write in time.

    The write itself stands on the primary; ``reservation_id`` names what it placed.
    """

    code = "not_replicated"

    def __init__(self, reservation_id: str, acknowledged: int, wanted: int) -> None:
        super().__init__(
            f"reservation {reservation_id} is held, but {acknowledged} of {wanted} replicas "
            "acknowledged it in time; retry with the same Idempotency-Key"
        )
        self.reservation_id = reservation_id
        self.acknowledged = acknowledged
        self.wanted = wanted


class ReservationOutcomeUnknown(InfrastructureError):
    """Redis kept losing the replies to a placement: ``reservation_id`` may or may not be held.

    The buyer can look it up by that id (or list their reservations in the sale).
    """

    code = "unavailable"

    def __init__(self, reservation_id: str, cause: str) -> None:
        super().__init__(
            f"redis did not answer ({cause}); reservation {reservation_id} may be held: "
            "look it up before trying again"
        )
        self.reservation_id = reservation_id


REJECTIONS: dict[str, type[RejectedError]] = {
    cls.code: cls
    for cls in (
        SaleNotFound,
        SaleExists,
        SaleNotActive,
        SoldOut,
        LimitReached,
        ReservationNotFound,
        ReservationPastDeadline,
        ReservationClosed,
        NotEnoughUnsoldStock,
        IdempotencyKeyReused,
    )
}
