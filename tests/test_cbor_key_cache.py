"""The map-key encoding cache keeps no hostile key alive (a refused input's huge keys are not retained).

Before, every key of every decoded map went into an LRU cache of 4,096 entries:
twenty refused inputs, each a map with one 8 MiB byte-string key, kept about
340 MiB alive in a long-running process such as ``pack watch``.
"""

from __future__ import annotations

import cbor2
import pytest

from qhx_edge.core import cbor
from qhx_edge.core.errors import Rejected


def test_a_refused_inputs_long_keys_are_not_kept_by_the_cache() -> None:
    cbor._cached_key_bytes.cache_clear()
    data = cbor2.dumps({b"k" * (1 << 20): 1.5})  # a float value: refused after the keys were encoded
    with pytest.raises(Rejected):
        cbor.decode(data, max_size=4 << 20)
    assert cbor._cached_key_bytes.cache_info().currsize == 0


def test_long_keys_are_encoded_without_the_cache_and_short_ones_with_it() -> None:
    cbor._cached_key_bytes.cache_clear()
    long_key = b"x" * (cbor.MAX_CACHED_KEY + 1)
    assert cbor.encode({long_key: 1, b"s": 2}) == cbor2.dumps({b"s": 2, long_key: 1})
    assert cbor._cached_key_bytes.cache_info().currsize == 1  # b"s" only
