"""Kubernetes resource quantities (``128Mi``, ``1024M``, ``500m``, ``1e3``).

Parsing follows ``k8s.io/apimachinery/pkg/api/resource``: a signed decimal number and a suffix
(binary SI ``Ki``..``Ei``, decimal SI ``n``..``E`` or a decimal exponent ``e3``). Values finer than
a nano unit are rounded up, as the Go type does. :func:`canonical` renders the canonical string
the Go type serialises (``2048Mi`` -> ``2Gi``, ``0.5`` -> ``500m``).
"""

from __future__ import annotations

import functools
import math
import re
from fractions import Fraction
from typing import Any

# The text of resource.ErrFormatWrong.
FORMAT_ERROR = (
    "quantities must match the regular expression "
    "'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
)

_NUMBER = re.compile(r"^([+-]?)(\d+\.?\d*|\.\d+)(.*)$")
_EXPONENT = re.compile(r"^[eE]([+-]?\d+)$")

_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_DECIMAL_SUFFIX = {v: k for k, v in _DECIMAL.items()}
_BINARY_SUFFIX = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
_MAX_EXPONENT = 1000

BINARY_SI = "BinarySI"
DECIMAL_SI = "DecimalSI"
DECIMAL_EXPONENT = "DecimalExponent"


class Quantity:
    """An exact quantity and the format it was written in. Immutable; equal when the amount and
    the format are."""

    __slots__ = ("_milli_value", "_value", "amount", "format")

    def __init__(self, amount: Fraction, format: str) -> None:
        self.amount = amount
        self.format = format
        # Admission asks for these many times; parsed quantities are shared (see _parse_text).
        if amount.denominator == 1:  # the usual case, without Fraction arithmetic
            self._value = amount.numerator
            self._milli_value = amount.numerator * 1000
        else:
            self._value = _round_up(amount)
            self._milli_value = _round_up(amount * 1000)

    def value(self) -> int:
        """The value rounded up to an integer (``resource.Quantity.Value``)."""
        return self._value

    def milli_value(self) -> int:
        return self._milli_value

    def is_zero(self) -> bool:
        return self.amount == 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Quantity):
            return NotImplemented
        return self.amount == other.amount and self.format == other.format

    def __hash__(self) -> int:
        return hash((self.amount, self.format))

    def __repr__(self) -> str:
        return f"Quantity(amount={self.amount!r}, format={self.format!r})"

    def __str__(self) -> str:
        return canonical(self)


def _round_up(x: Fraction) -> int:
    return math.ceil(x) if x >= 0 else -math.ceil(-x)


def parse(text: str) -> Quantity:
    """Parse ``text``; raise ``ValueError`` with :data:`FORMAT_ERROR` when it is malformed."""
    if not isinstance(text, str):
        raise ValueError(FORMAT_ERROR)
    return _parse_text(text)


@functools.lru_cache(maxsize=4096)
def _parse_text(text: str) -> Quantity:
    """:func:`parse` for strings, cached: the same few quantities recur in every object."""
    m = _NUMBER.match(text.strip())
    if m is None or not text.strip():
        raise ValueError(FORMAT_ERROR)
    sign, number, suffix = m.groups()
    try:
        amount = Fraction(number)
    except ValueError as e:
        raise ValueError(FORMAT_ERROR) from e
    if sign == "-":
        amount = -amount
    if suffix in _BINARY:
        amount *= 1024 ** _BINARY[suffix]
        fmt = BINARY_SI
    elif suffix in _DECIMAL:
        amount *= Fraction(10) ** _DECIMAL[suffix]
        fmt = DECIMAL_SI
    else:
        exp = _EXPONENT.match(suffix)
        # Exponents are bounded so a hostile "1e999999999" cannot build a giant integer.
        if exp is None or abs(int(exp.group(1))) > _MAX_EXPONENT:
            raise ValueError(FORMAT_ERROR)
        amount *= Fraction(10) ** int(exp.group(1))
        fmt = DECIMAL_EXPONENT
    # Anything below a nano unit is rounded up to the next nano unit.
    nanos = amount * 10**9
    if nanos.denominator != 1:
        amount = Fraction(_round_up(nanos), 10**9)
    return Quantity(amount, fmt)


def parse_value(value: Any) -> Quantity:
    """Parse a JSON value (a string or a number) as a quantity."""
    if isinstance(value, bool):
        raise ValueError(FORMAT_ERROR)
    if isinstance(value, int):
        return Quantity(Fraction(value), DECIMAL_SI)
    if isinstance(value, float):
        return parse(repr(value))
    if isinstance(value, str):
        return parse(value)
    raise ValueError(FORMAT_ERROR)


def canonical(q: Quantity) -> str:
    """The canonical text of ``q`` (``resource.Quantity.String``)."""
    amount = q.amount
    if amount == 0:
        return "0"
    fmt = q.format
    if fmt == BINARY_SI and (-1024 < amount < 1024 or amount.denominator != 1):
        fmt = DECIMAL_SI
    if fmt == BINARY_SI:
        number = int(amount)
        exponent = 0
        while exponent < 6 and number % 1024 == 0:
            number //= 1024
            exponent += 1
        return f"{number}{_BINARY_SUFFIX[exponent]}"
    mantissa, exponent = _decimal_parts(amount)
    if fmt == DECIMAL_EXPONENT:
        return f"{mantissa}e{exponent}" if exponent else str(mantissa)
    suffix = _DECIMAL_SUFFIX.get(exponent)
    if suffix is None:
        return f"{mantissa}e{exponent}"
    return f"{mantissa}{suffix}"


def _decimal_parts(amount: Fraction) -> tuple[int, int]:
    """``amount`` as ``mantissa * 10**exponent`` with the exponent a multiple of three."""
    exponent = 0
    while amount.denominator != 1:
        amount *= 10
        exponent -= 1
    mantissa = int(amount)
    while mantissa % 10 == 0:
        mantissa //= 10
        exponent += 1
    shift = exponent % 3
    return mantissa * 10**shift, exponent - shift


def text(value: Any) -> str:
    """How a quantity value appears in a message: canonical if it parses, else as given."""
    try:
        return canonical(parse_value(value))
    except ValueError:
        return str(value)
