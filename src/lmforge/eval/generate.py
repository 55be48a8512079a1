"""Generative tasks: greedy completions from the batched engine, answer extraction, exact match."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from ..errors import LMForgeError

# A number as people write it: optional sign and $, thousands separators, decimals.
_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\s?\.\d+")


def normalize_number(s: str) -> str | None:
    """'$1,234.50' -> '1234.5', '18.00' -> '18', '-0' -> '0'; None if ``s`` holds no number."""
    m = _NUMBER.search(s)
    if not m:
        return None
    t = m.group(0).replace("$", "").replace(",", "").replace(" ", "")
    try:
        v = float(t)
    except ValueError:
        return None
    if not math.isfinite(v):  # more digits than a float holds: the digits themselves are the answer
        return t
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def extract_answer(text: str, how: str = "number") -> str | None:
    """The answer in a completion.

    ``number``: the first number after the last ``####`` (GSM8K's answer marker), else the last number
    in the text. ``regex:PATTERN``: the pattern's first group (or whole match) at its last match.
    """
    if how == "number":
        if "####" in text:
            got = normalize_number(text.rsplit("####", 1)[1])
            if got is not None:
                return got
        nums = _NUMBER.findall(text)
        # A sentence-final full stop is not a decimal point: "is 5." -> "5".
        return normalize_number(nums[-1].rstrip(".")) if nums else None
    if how.startswith("regex:"):
        try:
            found = list(re.finditer(how[6:], text))
        except re.error as e:
            raise LMForgeError(f"bad answer regex {how[6:]!r}: {e}") from None
        if not found:
            return None
        m = found[-1]
        return (m.group(1) if m.groups() else m.group(0)).strip()
    raise LMForgeError(f"unknown answer extraction {how!r} (use 'number' or 'regex:PATTERN')")


def is_correct(prediction: str | None, reference: str, how: str = "number") -> bool:
    """Exact match of the extracted prediction with the reference's own extracted answer."""
    if prediction is None:
        return False
    ref = extract_answer(reference, how) if how == "number" else reference.strip()
    return ref is not None and prediction == ref


def drive(engine: Any, seqs: list[Any], desc: str, progress: bool, unit: str = "item",
          after_step: Callable[[], None] | None = None) -> None:
    """Step ``engine`` until every one of ``seqs`` is done, with a bar of the finished ones when
    ``progress``; ``after_step`` runs after each step (e.g. to cancel sequences whose answer is written)."""
    from tqdm import tqdm

    bar = tqdm(total=len(seqs), desc=desc, disable=not progress, unit=unit)
    done = 0
    try:
        while not all(s.done for s in seqs):
            engine.step()
            if after_step is not None:
                after_step()
            now = sum(s.done for s in seqs)
            bar.update(now - done)
            done = now
    finally:
        bar.close()
