"""The command API: one command table, its pydantic models, events and subscriptions.

Knows nothing of the wire: dialects (JSON-RPC, QMP) call :func:`ramd.api.dispatch.call` with a
command name and a params dict and encode what comes back.
"""
