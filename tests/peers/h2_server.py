"""HTTP/2 (h2c: prior knowledge and HTTP/1.1 Upgrade) server for the integration
tests: hypercorn with a tiny ASGI app. /ok -> 200 "hello h2", /fail -> 503, anything
else -> 404. Usage: h2_server.py PORT. Prints "ready" once listening.
"""
import asyncio
import sys

from hypercorn.asyncio import serve
from hypercorn.config import Config

PORT = int(sys.argv[1])


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    # Read the whole request body.
    while True:
        message = await receive()
        if not message.get("more_body"):
            break
    path = scope["path"]
    if path == "/ok":
        status, body = 200, b"hello h2"
    elif path == "/fail":
        status, body = 503, b"unavailable"
    else:
        status, body = 404, b"not found"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


config = Config()
config.bind = [f"127.0.0.1:{PORT}"]
config.accesslog = None
config.errorlog = "-"
config.loglevel = "WARNING"


async def main():
    shutdown = asyncio.Event()
    task = asyncio.ensure_future(serve(app, config, shutdown_trigger=shutdown.wait))
    # Ready when the socket accepts.
    for _ in range(400):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", PORT)
            w.close()
            break
        except OSError:
            await asyncio.sleep(0.05)
    print("ready", flush=True)
    await task


asyncio.run(main())
