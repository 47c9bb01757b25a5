"""A zero-delay OpenAI-compatible double (`POST /v1/chat/completions`) for the LiteLLM comparison.

Raw ASGI, so the peer's upstream costs as little as ours. `python -m bench.openai_double PORT`.
"""

from __future__ import annotations

import sys
import time

import msgspec
import uvicorn

from adapter.tasks import TASKS

ANSWER = msgspec.json.encode(TASKS["lead.qualify"].sample_answer(
    {"name": "Maria Silva", "company": "Acme", "job_title": "VP of Sales"}, {})).decode()


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    if scope["path"].endswith("/models"):
        body = msgspec.json.encode({"object": "list", "data": [{"id": "double", "object": "model"}]})
    else:
        body = msgspec.json.encode({
            "id": "chatcmpl-double", "object": "chat.completion", "created": int(time.time()), "model": "double",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 100, "total_tokens": 200}})
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=False, log_level="warning", loop="uvloop", http="httptools")
