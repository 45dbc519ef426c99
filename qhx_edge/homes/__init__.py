"""Homes: a node's and an authority's operations, composed from the drivers.

Import and export of packs, attestation exchanges, evidence, the drop-folder
watcher and status: each opens a home (its store and keys) and drives
:mod:`qhx_edge.packs`, :mod:`qhx_edge.attest` and :mod:`qhx_edge.issue` with
the pure rules of :mod:`qhx_edge.core`.
"""
