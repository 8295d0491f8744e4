"""CSI names and ids as volkin names, and the tokens of paginated lists.

A CSI volume id is the volkin volume's name and a snapshot id the volkin snapshot's
name. The CO picks the names (`pvc-<uuid>`, `snapshot-<uuid>`): any Unicode string of up to
128 bytes, while volkin takes 1-128 letters, digits, '-', '_' and '.'. A name volkin takes is
used as it is; any other maps to `csi-` and a digest of it. The mapping is a pure function
of the name, so that a retried CreateVolume finds the volume the first call made.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

from volkin.errors import Aborted

T = TypeVar("T")
_MAX = 128


class BadToken(Aborted):
    """A starting_token this driver did not hand out (CSI answers ABORTED)."""


def is_volkin_name(name: str) -> bool:
    """The rule volkin's engine applies to a new volume's name."""
    return 0 < len(name) <= _MAX and all(c.isascii() and (c.isalnum() or c in "-_.")
                                         for c in name)


def volkin_name(csi_name: str) -> str:
    """The volkin name for the CO's name: the same name where volkin takes it."""
    if is_volkin_name(csi_name):
        return csi_name
    return "csi-" + hashlib.sha256(csi_name.encode()).hexdigest()[:40]


# A token is the name of the last entry handed out, hex-encoded behind a tag: the next
# page starts after that name, so entries created or deleted between pages move no one.
_TAG = "after."


def token_after(name: str) -> str:
    return _TAG + name.encode().hex()


def page(items: Sequence[T], names: Sequence[str], starting_token: str,
         max_entries: int) -> tuple[list[T], str]:
    """One page of `items` (sorted by `names`) and the token of the next, "" at the end."""
    start = 0
    if starting_token:
        if not starting_token.startswith(_TAG):
            raise BadToken(f"starting_token {starting_token!r} was not handed out by this "
                           "driver; list again without it")
        try:
            after = bytes.fromhex(starting_token[len(_TAG):]).decode()
        except ValueError:
            raise BadToken(f"starting_token {starting_token!r} is damaged; list again "
                           "without it") from None
        start = next((i for i, n in enumerate(names) if n > after), len(names))
    end = len(items) if max_entries <= 0 else min(len(items), start + max_entries)
    following = token_after(names[end - 1]) if end < len(items) else ""
    return list(items[start:end]), following
