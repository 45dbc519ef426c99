"""The local clock, read in one place.

Nothing in the trust core reads the clock: commands read it once here and pass
the value down (a fixed reference time per operation).  The local clock is not
trusted on its own: :func:`qhx_edge.core.trust.check_clock` compares it with the
persisted trusted-time mark.  ``faketime`` moves it in tests, as it would move
a real misconfigured clock.
"""

from __future__ import annotations

import time


def now() -> int:
    return int(time.time())
