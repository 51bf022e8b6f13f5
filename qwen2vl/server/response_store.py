"""Stored responses, for `previous_response_id` and `GET /v1/responses/{id}`: in memory, the newest
of them within two caps (--max-stored-responses, --max-stored-responses-mb), the oldest evicted
first; gone when the server stops.

Each entry keeps the response and its whole conversation as input items (the earlier turns', this
request's input, this response's output), so a follow-up only prepends one list. Items are shared
between entries, not copied; an entry is still charged its whole conversation's size (the length of
its strings: base64 media counts in full), so the byte cap holds however the entries share (a long
chat with images evicts its older turns first).
"""

from collections import OrderedDict

from qwen2vl.server.errors import APIError


class ResponseStore:
    def __init__(self, capacity: int, max_bytes: int):
        assert capacity > 0 and max_bytes > 0
        self.capacity, self.max_bytes = capacity, max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[dict, list[dict], int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response: dict, conversation: list[dict]) -> None:
        """Keep it, evicting the oldest past either cap (one bigger than the byte cap is not kept)."""
        size = _size([response, conversation])
        self._entries[response["id"]] = (response, conversation, size)
        self.bytes += size
        while self._entries and (len(self._entries) > self.capacity or self.bytes > self.max_bytes):
            self.bytes -= self._entries.popitem(last=False)[1][2]

    def response(self, rid: str, param: str | None = None) -> dict:
        return self._entry(rid, param)[0]

    def conversation(self, rid: str, param: str | None = None) -> list[dict]:
        return self._entry(rid, param)[1]

    def _entry(self, rid: str, param: str | None):
        entry = self._entries.get(rid)
        if entry is None:
            where = f"{param}: " if param else ""
            raise APIError(404, f"{where}no stored response {rid!r}; this server keeps the newest responses made "
                                f"with store=true in memory, at most {self.capacity} (--max-stored-responses) "
                                f"and {self.max_bytes / 2**20:g} MiB (--max-stored-responses-mb)",
                           param=param, code="response_not_found")
        return entry


def _size(value) -> int:
    """About the bytes `value` holds: its strings' lengths (O(1) each, so a 30 MB data URI costs
    nothing to measure) plus a little per number and container."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(k) + _size(v) for k, v in value.items()) + 8
    if isinstance(value, list):
        return sum(_size(v) for v in value) + 8
    return 8
