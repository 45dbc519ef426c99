"""qhx-edge: an offline-first workload trust gateway for field nodes.

See ``docs/architecture.md`` for what each module owns and how data flows.
"""

__version__ = "0.1.0"
