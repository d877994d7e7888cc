-- events_by_sale (sale_id) served one read: verify's event ids of one sale, a tool run by
-- hand that reads the sale's whole log besides (and every event id when given no sale).
-- Scanning the archive for it costs that rare run about what reading the log does; the
-- index cost the projector an index insertion (a descent of the tree, a WAL record) per
-- archived event.

DROP INDEX IF EXISTS events_by_sale;
