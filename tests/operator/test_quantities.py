"""Resource quantities compare exactly, whatever their suffix."""

from __future__ import annotations

from fractions import Fraction

import pytest

from unlearning_operator.quantities import quantity

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4", Fraction(4)),
        ("500m", Fraction(1, 2)),
        ("1.1", Fraction(11, 10)),
        ("1100m", Fraction(11, 10)),
        ("16Gi", Fraction(16 * 2**30)),
        ("1G", Fraction(10**9)),
        ("1.5Ki", Fraction(1536)),
        ("0", Fraction(0)),
    ],
)
def test_values(text: str, value: Fraction) -> None:
    assert quantity(text) == value


def test_binary_and_decimal_suffixes_differ() -> None:
    assert quantity("1Gi") > quantity("1G")
    assert quantity("1024Mi") == quantity("1Gi")


@pytest.mark.parametrize("text", ["", "16 GB", "1e3", "-1", "Gi", "1.", "4cores"])
def test_other_text_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a resource quantity"):
        quantity(text)
