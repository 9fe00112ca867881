"""argparse types for fedhash's numeric options: a value out of range is refused by the parser, before any
work, with one line naming the option's value and the range (``fedhash <command>: error: argument ...``)."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def number(kind: type, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           example: str = "") -> Callable[[str], int | float]:
    """``kind`` (int or float) in [low, high] (``low_open``: above low), finite."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}"
                                             + (f"; e.g. {example}" if example else "")) from None
        if isinstance(v, float) and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number" + (f"; e.g. {example}" if example else ""))
        if low is not None and (v <= low if low_open else v < low):
            raise argparse.ArgumentTypeError(f"{text} must be {'above' if low_open else 'at least'} {low:g}"
                                             + (f"; e.g. {example}" if example else ""))
        if high is not None and v > high:
            raise argparse.ArgumentTypeError(f"{text} must be at most {high:g}" + (f"; e.g. {example}" if example else ""))
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = number(int, 1, example="10")
positive_float = number(float, 0, low_open=True, example="0.05")
port = number(int, 1, 65535, example="8080")


def bits_list(text: str) -> str:
    """A comma-separated list of code lengths, each a multiple of 8 up to hashing.codes.MAX_BITS."""
    from hashing.codes import check_bits
    from hashing.errors import FedhashError

    try:
        for b in text.split(","):
            check_bits(int(b))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers; e.g. 16,32,64") from None
    except FedhashError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text
