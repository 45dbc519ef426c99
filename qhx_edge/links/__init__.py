"""Links: TLS 1.3 streams over trio and the SPIFFE bundle endpoint (docs/architecture.md, "Bundle endpoint").

A driver: imports :mod:`qhx_edge.core` and :mod:`qhx_edge.store` only; what it serves (the
bundle, the endpoint's SVID) is handed in by the caller as functions.
"""
