"""The pure layer: rules and formats, no I/O.

Nothing here opens a file or a socket, touches SQLite, gRPC or the operating
system, or reads the clock: every function takes the bytes, the reference time
(``now``) and the persisted state it needs, and returns a value or raises a
typed error from :mod:`qhx_edge.core.errors`.  The import-linter contracts in
``pyproject.toml`` enforce it; ``docs/architecture.md`` says what each module
owns.
"""
