"""The wire protocol without I/O: the JSON stream splitter, JSON parsing, and the JSON-RPC
and QMP dialects, which turn messages into calls of the command table and outcomes into
answers. Nothing here touches a socket."""
