"""Kubernetes resource quantities as exact numbers, to compare a request against a bound. Pure.

Only the forms the request spec and the settings accept: a decimal number
with an optional ``m`` (CPU) or a binary (Ki..Ti) or decimal (K..T) suffix
(memory). Fractions, not floats: ``"1.1"`` CPUs must not compare below
``"1100m"`` by a rounding error.
"""

from __future__ import annotations

import re
from fractions import Fraction

_QUANTITY = re.compile(r"^(?P<number>\d+(\.\d+)?)(?P<suffix>m|Ki|Mi|Gi|Ti|K|M|G|T)?$")
_FACTORS = {
    None: Fraction(1),
    "m": Fraction(1, 1000),
    "K": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "Ki": Fraction(2**10),
    "Mi": Fraction(2**20),
    "Gi": Fraction(2**30),
    "Ti": Fraction(2**40),
}


def quantity(text: str) -> Fraction:
    """The value of ``"500m"``, ``"4"``, ``"16Gi"``; ValueError for anything else."""
    match = _QUANTITY.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a resource quantity")
    return Fraction(match["number"]) * _FACTORS[match["suffix"]]
