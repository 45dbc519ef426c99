"""Node attestation mechanisms: the TPM 2.0 client and the authority's TPM checks.

A driver: imports :mod:`qhx_edge.core` and :mod:`qhx_edge.store` only; the
optional ``tpm2-pytss`` (extra ``qhx-edge[tpm]``) is imported only when a TPM is
used.
"""
