"""Stored responses, for `previous_response_id` and `GET /v1/responses/{id}`: in memory, the newest
`capacity` of them (--max-stored-responses), the oldest evicted first; gone when the server stops.

Each entry keeps the response and its whole conversation as input items (the earlier turns', this
request's input, this response's output), so a follow-up only prepends one list. Items are shared
between entries, not copied, so a long chain costs its items once.
"""

from collections import OrderedDict

from qwen2vl.server.errors import APIError


class ResponseStore:
    def __init__(self, capacity: int):
        assert capacity > 0
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[dict, list[dict]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, response: dict, conversation: list[dict]) -> None:
        self._entries[response["id"]] = (response, conversation)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def response(self, rid: str, param: str | None = None) -> dict:
        return self._entry(rid, param)[0]

    def conversation(self, rid: str, param: str | None = None) -> list[dict]:
        return self._entry(rid, param)[1]

    def _entry(self, rid: str, param: str | None):
        entry = self._entries.get(rid)
        if entry is None:
            where = f"{param}: " if param else ""
            raise APIError(404, f"{where}no stored response {rid!r}; this server keeps the newest {self.capacity} "
                                "responses made with store=true, in memory (--max-stored-responses)",
                           param=param, code="response_not_found")
        return entry
