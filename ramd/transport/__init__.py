"""Transports of the daemon: socket servers and the JSON stream splitter."""
