-- How far the pruning worker got on each partition: every final event below this position
-- (stream_ms, stream_seq) has had its reservation removed from Redis.

CREATE TABLE prune_checkpoints (
    partition  integer     PRIMARY KEY,
    stream_ms  bigint      NOT NULL,
    stream_seq bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
