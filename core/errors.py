"""The exception hierarchy; the HTTP layer maps these to problem responses."""

from __future__ import annotations

from typing import ClassVar, Literal

#: What a write under ``FLASHSALE_WAIT_REPLICAS`` did to a reservation.
WriteAction = Literal["reserve", "confirm", "cancel"]
#: What an admin's write under ``FLASHSALE_WAIT_REPLICAS`` did to a sale.
SaleAction = Literal["create", "restock", "close"]


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


class Unreplicated(InfrastructureError):
    """Fewer replicas than ``FLASHSALE_WAIT_REPLICAS`` acknowledged a write in time; the
    write itself stands on the primary. Each kind says, by ``action``, what stands and how
    to repeat the request safely."""

    code = "not_replicated"

    # What stands on the primary, and how to repeat the request, by action.
    _STANDS: ClassVar[dict[str, tuple[str, str]]] = {}

    def __init__(self, subject: str, acknowledged: int, wanted: int, action: str) -> None:
        stands, retry = self._STANDS[action]
        super().__init__(
            f"{subject} {stands}, but {acknowledged} of {wanted} replicas acknowledged it in"
            f" time; {retry}"
        )
        self.acknowledged = acknowledged
        self.wanted = wanted


class NotReplicated(Unreplicated):
    """A placement, payment or cancellation (``action``) not acknowledged in time:
    ``reservation_id`` names the reservation, and repeating the same request is safe."""

    _STANDS: ClassVar[dict[str, tuple[str, str]]] = {
        "reserve": ("is held", "retry with the same Idempotency-Key"),
        "confirm": (
            "is confirmed: the payment is recorded",
            "repeating the same request is safe (it pays once)",
        ),
        "cancel": (
            "is cancelled: the cancellation is recorded",
            "repeating the same request is safe (it cancels once)",
        ),
    }

    def __init__(
        self, reservation_id: str, acknowledged: int, wanted: int, action: WriteAction = "reserve"
    ) -> None:
        super().__init__(f"reservation {reservation_id}", acknowledged, wanted, action)
        self.reservation_id = reservation_id
        self.action: WriteAction = action


class SaleNotReplicated(Unreplicated):
    """An admin's write to a sale (``action``: open it, change its stock, close it) not
    acknowledged in time: ``sale_id`` names the sale."""

    _STANDS: ClassVar[dict[str, tuple[str, str]]] = {
        "create": ("is open", "repeat it with the same Idempotency-Key"),
        "restock": (
            "has its stock changed",
            "repeat it with the same Idempotency-Key (without one, a repeat changes the"
            " stock again)",
        ),
        "close": ("is closed", "repeating the same request is safe"),
    }

    def __init__(self, sale_id: str, acknowledged: int, wanted: int, action: SaleAction) -> None:
        super().__init__(f"sale {sale_id}", acknowledged, wanted, action)
        self.sale_id = sale_id
        self.action: SaleAction = action


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
