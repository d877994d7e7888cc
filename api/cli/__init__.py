"""The ``flashsale`` command line: parser and dispatch (``main``), process wiring and signals,
operator and replay commands, the demo, its load generator and the embedded-server launcher."""
