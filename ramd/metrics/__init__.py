"""Metrics (docs/protocol.md §15): figures the daemon counts as it runs, a consistent snapshot of
them taken on the loop thread, and the HTTP endpoint that serves them to Prometheus.

Only :mod:`ramd.metrics.collector` and :mod:`ramd.metrics.http` import ``prometheus_client``,
and the daemon imports them only when ``metrics-listen`` is set (the library imports ``ssl``
and ``http.server``: a daemon without metrics maps neither).
"""
