"""What server and client agree on beyond Arrow Flight itself: action names and error prefixes.

Flight carries a server's exception to the client only as a status code plus message text, so
the error kinds a client must tell apart are marked by a fixed message prefix.
"""

from __future__ import annotations

BACK_PRESSURE = "back-pressure:"
"""Prefix of the error of a refused put, followed by `size=N used=N capacity=N key=...`."""

UNKNOWN_KEY = "unknown key:"
"""Prefix of the error of a get of a key the store does not hold."""

ACTIONS: dict[str, str] = {
    "drop_prefix": "Remove every key starting with the UTF-8 prefix in the body; "
    'returns JSON {"dropped": n, "bytes_freed": b}',
    "stats": "Return JSON counters: keys, bytes_used, capacity_bytes, puts, gets, refused, bytes_in, bytes_out",
    "health": 'Return b"ok" while the server is serving',
}
"""The server's actions (`do_action` types) and their descriptions (as `list_actions` reports them)."""
