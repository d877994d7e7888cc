-- The event archive, the read projections and the consumer checkpoints.

CREATE TABLE events (
    event_id     text PRIMARY KEY,
    partition    integer     NOT NULL,
    stream_id    text        NOT NULL,
    stream_ms    bigint      NOT NULL,
    stream_seq   bigint      NOT NULL,
    sale_id      text        NOT NULL,
    type         text        NOT NULL,
    occurred_at  timestamptz NOT NULL,
    payload      jsonb       NOT NULL,
    archived_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_by_position ON events (partition, stream_ms, stream_seq);
CREATE INDEX events_by_sale ON events (sale_id);

CREATE TABLE orders (
    reservation_id text PRIMARY KEY,
    sale_id        text        NOT NULL,
    user_id        text        NOT NULL,
    qty            integer     NOT NULL CHECK (qty > 0),
    status         text        NOT NULL
                   CHECK (status IN ('pending', 'confirmed', 'cancelled', 'expired')),
    placed_at      timestamptz,
    expires_at     timestamptz,
    confirmed_at   timestamptz,
    cancelled_at   timestamptz,
    expired_at     timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_by_sale ON orders (sale_id, status);
CREATE INDEX orders_by_user ON orders (sale_id, user_id);

CREATE TABLE stock_view (
    sale_id        text PRIMARY KEY,
    stock          bigint  NOT NULL DEFAULT 0,
    remaining      bigint  NOT NULL DEFAULT 0,
    held           bigint  NOT NULL DEFAULT 0,
    confirmed      bigint  NOT NULL DEFAULT 0,
    released       bigint  NOT NULL DEFAULT 0,
    per_user_limit integer,
    hold_seconds   integer,
    starts_at      timestamptz,
    ends_at        timestamptz,
    closed         boolean NOT NULL DEFAULT false,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE checkpoints (
    consumer_group text        NOT NULL,
    partition      integer     NOT NULL,
    stream_id      text        NOT NULL,
    stream_ms      bigint      NOT NULL,
    stream_seq     bigint      NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, partition)
);
