-- orders_by_sale (sale_id, status) is redundant: every read of a sale's orders (verify, the
-- demo's report) filters on sale_id alone, which orders_by_user (sale_id, user_id) serves
-- as well. Each index costs the projector an insertion per order row (about a fifth of the
-- orders INSERT of a batch of placements), so the redundant one goes.

DROP INDEX IF EXISTS orders_by_sale;
