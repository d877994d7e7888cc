"""The PostgreSQL tables, one module each, owning every statement on its table.

``events`` (the archive), ``orders``, ``stock_view``, the three checkpoint tables
(``checkpoints``, ``prune_checkpoints``, ``rebuild_checkpoints``) and the rebuild's
transient ``*_rebuild`` tables. The tables themselves come from the ordered migrations
(``projections/migrations``); the modules that project, verify, rebuild, trim and prune
call these functions instead of writing SQL.
"""
