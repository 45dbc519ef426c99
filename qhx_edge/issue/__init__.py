"""Issuance: the SVID issuer and the SPIFFE Workload API server.

A driver: imports :mod:`qhx_edge.core` and :mod:`qhx_edge.store` only.
"""
