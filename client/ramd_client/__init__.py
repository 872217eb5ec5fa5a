"""ramd_client: the Python client library of ramd (``connect``, ``AsyncClient``, ``Client``)."""
