"""Packs: the sneakernet wire format (signed manifest) and HPKE sealing.

A driver: imports :mod:`qhx_edge.core` and :mod:`qhx_edge.store` only.
"""
