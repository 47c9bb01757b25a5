"""A raw ASGI backend for the pass-through tests: it reports what reached it and streams big bodies."""

from __future__ import annotations

import asyncio
import hashlib

import msgspec

CHUNK = 64 * 1024


class EchoBackend:
    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.delay = 0.0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        digest, size = hashlib.sha256(), 0
        while True:  # consume the body chunk by chunk, never holding it
            message = await receive()
            digest.update(message.get("body", b""))
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        path = scope["path"]
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"]]
        self.seen.append({"method": scope["method"], "path": path, "raw_path": scope.get("raw_path", b"").decode(),
                          "query": scope["query_string"].decode(), "headers": headers, "size": size})
        if self.delay:
            await asyncio.sleep(self.delay)
        if path.startswith("/download/"):
            total = int(path.rsplit("/", 1)[1])
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/octet-stream"), (b"content-length", str(total).encode())]})
            block = b"x" * CHUNK
            for offset in range(0, total, CHUNK):
                await send({"type": "http.response.body", "body": block[: min(CHUNK, total - offset)], "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        status = int(path.rsplit("/", 1)[1]) if path.startswith("/status/") else 200
        body = msgspec.json.encode({"method": scope["method"], "path": path, "query": scope["query_string"].decode(),
                                    "size": size, "sha256": digest.hexdigest(), "headers": headers})
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"set-cookie", b"a=1; Path=/"), (b"set-cookie", b"b=2; Path=/"),
            (b"connection", b"x-hop"), (b"x-hop", b"must-not-pass"), (b"keep-alive", b"timeout=5"), (b"x-backend", b"echo"),
            (b"access-control-allow-origin", b"*")]})  # the backend's own CORS answer
        await send({"type": "http.response.body", "body": body})
