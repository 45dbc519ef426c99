"""The node's durable state and its view of the machine.

The SQLite files (trust store with its audit chain), atomic file writes, keys at
rest and the one place the local clock is read.  Imports :mod:`qhx_edge.core`
only.
"""
