"""How hard the reliability suite pushes: a bounded run by default, a long run with RETRIEVE_RELIABILITY=long.

RETRIEVE_RELIABILITY=long python -m pytest tests/reliability -q -s
"""

from __future__ import annotations

import os

LONG = os.environ.get("RETRIEVE_RELIABILITY", "").lower() == "long"


def scale(bounded: int, long: int) -> int:
    return long if LONG else bounded
