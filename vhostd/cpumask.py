"""CPU masks as SPDK writes them: hex (``0x3`` or ``3``) or a list (``[0,1-3]``)."""

from __future__ import annotations

import re

from .errors import InvalidArgument

MAX_CORES = 1024
_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse(text: str) -> list[int]:
    """Cores of a mask, sorted.  InvalidArgument for anything else, or an empty mask."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgument("empty cpumask")
    text = text.strip()
    cores: set[int] = set()
    if text.startswith("["):
        if not text.endswith("]"):
            raise InvalidArgument("cpumask %r: missing ]" % text)
        for part in text[1:-1].split(","):
            m = _RANGE.match(part)
            if not m:
                raise InvalidArgument("cpumask %r: bad element %r" % (text, part))
            low = int(m.group(1))
            high = int(m.group(2)) if m.group(2) is not None else low
            if high < low or high >= MAX_CORES:
                raise InvalidArgument("cpumask %r: bad range %r" % (text, part))
            cores.update(range(low, high + 1))
    else:
        digits = text[2:] if text.lower().startswith("0x") else text
        try:
            value = int(digits, 16)
        except ValueError:
            raise InvalidArgument("cpumask %r is neither hex nor a [list]" % text) from None
        if value.bit_length() > MAX_CORES:
            raise InvalidArgument("cpumask %r names cores beyond %d" % (text, MAX_CORES - 1))
        cores = {bit for bit in range(value.bit_length()) if value >> bit & 1}
    if not cores:
        raise InvalidArgument("cpumask %r selects no core" % text)
    return sorted(cores)


def to_int(cores: list[int]) -> int:
    value = 0
    for core in cores:
        value |= 1 << core
    return value


def format_hex(cores: list[int], prefix: bool = True) -> str:
    """``0x3`` (or ``3`` without prefix, as SPDK writes cpumasks in saved configs and thread stats)."""
    return ("0x%x" if prefix else "%x") % to_int(cores)


def within(cores: list[int], app_cores: list[int]) -> list[int]:
    """cores, checked to lie within the application's cores."""
    outside = sorted(set(cores) - set(app_cores))
    if outside:
        raise InvalidArgument("cores %s are outside the application cpumask %s"
                              % (outside, format_hex(app_cores)))
    return cores
