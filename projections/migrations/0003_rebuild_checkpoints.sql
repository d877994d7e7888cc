-- How far the last rebuild got on each partition: the log position (stream_ms, stream_seq)
-- that the rebuilt orders and stock_view reflect, written in the rebuild's transactions.
-- Before this migration the rebuild created the table itself, with this same definition:
-- IF NOT EXISTS lets a database that already has it migrate.

CREATE TABLE IF NOT EXISTS rebuild_checkpoints (
    partition  integer     PRIMARY KEY,
    stream_id  text        NOT NULL,
    stream_ms  bigint      NOT NULL,
    stream_seq bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
