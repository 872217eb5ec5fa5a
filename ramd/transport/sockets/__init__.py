"""The transport's I/O: listeners (``server``, ``unixbind``), connections and peer
credentials, admission, the request pipeline of a connection and its ordered output with fd
passing (``output``, ``fdflight``)."""
