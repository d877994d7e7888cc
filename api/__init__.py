"""flashsale's two interfaces: the HTTP application (``api.web``) and the ``flashsale``
command line (``api.cli``), and the connections both build (``api.connections``)."""
