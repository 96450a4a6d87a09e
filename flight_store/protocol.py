"""What server and client agree on beyond Arrow Flight itself: action names and error prefixes.

Flight carries a server's exception to the client only as a status code plus message text, so
the error kinds a client must tell apart are marked by a fixed message prefix.
"""

from __future__ import annotations

import json

BACK_PRESSURE = "back-pressure:"
"""Prefix of the error of a refused put, followed by `size=N used=N capacity=N key=...`."""

UNKNOWN_KEY = "unknown key:"
"""Prefix of the error of a get of a key the store does not hold."""

BAD_TICKET = "bad ticket:"
"""Prefix of the error of a get whose ticket cannot be read or asks for rows the table lacks."""


def encode_ticket(key: str, offset: int | None = None, length: int | None = None) -> bytes:
    """A `do_get` ticket: the key itself for the whole table, or, for rows offset .. offset + length
    only, JSON `{"key", "offset", "length"}` (keys never start with '{', so the two cannot clash)."""
    if offset is None:
        return key.encode()
    return json.dumps({"key": key, "offset": offset, "length": length}).encode()


def decode_ticket(ticket: bytes) -> tuple[str, int | None, int | None]:
    """(key, offset, length) of a ticket from `encode_ticket`; offset None = the whole table.
    Raises ValueError for a ticket that is neither."""
    if not ticket.startswith(b"{"):
        return ticket.decode("utf-8", errors="replace"), None, None
    try:
        fields = json.loads(ticket)
        key, offset, length = fields["key"], fields["offset"], fields["length"]
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"unreadable slice ticket ({error!r})") from None
    if not isinstance(key, str) or any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in (offset, length)):
        raise ValueError(f"slice ticket needs a string key and non-negative integer offset/length, got {fields!r}")
    return key, offset, length

ACTIONS: dict[str, str] = {
    "drop_prefix": "Remove every key starting with the UTF-8 prefix in the body; "
    'returns JSON {"dropped": n, "bytes_freed": b}',
    "stats": "Return JSON counters: keys, bytes_used, capacity_bytes, puts, gets, refused, bad_schema, bytes_in, "
             "bytes_out",
    "health": 'Return b"ok" while the server is serving',
}
"""The server's actions (`do_action` types) and their descriptions (as `list_actions` reports them)."""
