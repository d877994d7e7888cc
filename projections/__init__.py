"""flashsale projections: the PostgreSQL schema (ordered migrations) and one module per
table (``projections.tables``), the batch projection, the fold, the log reader and the
replay tools (verify, repair, rebuild).

Nothing is re-exported: callers import from the module that defines a name.
"""

__all__: list[str] = []
