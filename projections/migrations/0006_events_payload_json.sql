-- The archived payload as json (its text, checked to be JSON), not jsonb (parsed into a
-- binary tree): the projector writes every event's payload once and the archive's readers
-- want it back as text (the log reader) or read a field or two of a few (pruning), never
-- query inside it. Building the jsonb took nearly half of the PostgreSQL CPU of the
-- projector's COPY; checking the json costs a fraction of that. Rewrites the table, once.

ALTER TABLE events ALTER COLUMN payload TYPE json USING payload::json;
