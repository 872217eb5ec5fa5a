"""ramd: a daemon that owns resizable RAM blocks and serves them over JSON-RPC 2.0 and QMP."""

__version__ = "0.1.0"
