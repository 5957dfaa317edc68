"""The reference topology of the trace accuracy benchmark (`cargo xtask bench accuracy`).

    gateway (nginx, starts each trace: a fresh traceparent per request)
      -> A  thread-per-request HTTP/1 server (http.server.ThreadingHTTPServer)
           -> B  gRPC server (grpcio), unary demo.Orders/Get
           -> C  asyncio HTTP/1 server, several requests in flight on its one thread

Usage (each prints "ready" once listening):
    topology.py a PORT B_PORT C_PORT forward|none
    topology.py b PORT
    topology.py c PORT
    topology.py d PORT C_PORT
        an asyncio HTTP/1 server that calls C for each request (GET /x/N ->
        GET /stock/N), forwarding nothing: an event loop with several requests
        open on its one thread, which the agent must not guess at.
    topology.py drive PORT REQUESTS CONCURRENCY [PREFIX]
        sends GET PREFIX<n> (default /order/) for n in 0..REQUESTS, CONCURRENCY at a time (one
        keep-alive connection per worker), prints "done <ok> <failed>".

In `forward` mode A passes the trace headers it received on to B and C, as a
service instrumented for propagation does; in `none` mode it passes nothing.
"""
import asyncio
import http.client
import http.server
import sys
import threading
from concurrent import futures

TRACE_HEADERS = ("traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid",
                 "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "uber-trace-id")


def service_a(port, b_port, c_port, mode):
    import grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{b_port}")
    get = channel.unary_unary("/demo.Orders/Get")

    class A(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            n = self.path.rsplit("/", 1)[-1]
            fwd = []
            if mode == "forward":
                fwd = [(h, self.headers[h]) for h in TRACE_HEADERS if self.headers[h] is not None]
            reply = get(n.encode(), metadata=fwd, timeout=10)
            c = http.client.HTTPConnection("127.0.0.1", c_port, timeout=10)
            c.request("GET", f"/stock/{n}", headers=dict(fwd))
            r = c.getresponse()
            stock = r.read()
            c.close()
            body = reply + b" " + stock
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    http.server.ThreadingHTTPServer.daemon_threads = True
    s = http.server.ThreadingHTTPServer(("127.0.0.1", port), A)
    print("ready", flush=True)
    s.serve_forever()


def service_b(port):
    import grpc

    def get(request, context):
        return b"order-" + request

    handler = grpc.method_handlers_generic_handler(
        "demo.Orders", {"Get": grpc.unary_unary_rpc_method_handler(get)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def service_c(port):
    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0].split(b" ")
                # Requests overlap on the loop's one thread.
                await asyncio.sleep(0.005)
                body = b"stock-" + line[1].rsplit(b"/", 1)[-1]
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def service_d(port, c_port):
    async def call_c(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", c_port)
        writer.write(b"GET /stock/%s HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n" % n)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
        writer.close()
        return body

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                n = head.split(b"\r\n", 1)[0].split(b" ")[1].rsplit(b"/", 1)[-1]
                await asyncio.sleep(0.01)
                body = await call_c(n)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def drive(port, total, conc, prefix="/order/"):
    lock = threading.Lock()
    todo = iter(range(total))
    ok = [0, 0]

    def worker():
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while True:
            with lock:
                n = next(todo, None)
            if n is None:
                break
            try:
                c.request("GET", f"{prefix}{n}")
                r = c.getresponse()
                r.read()
                good = r.status == 200
            except (OSError, http.client.HTTPException):
                good = False
                c.close()
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            with lock:
                ok[0 if good else 1] += 1
        c.close()

    threads = [threading.Thread(target=worker) for _ in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"done {ok[0]} {ok[1]}", flush=True)


if __name__ == "__main__":
    role, args = sys.argv[1], sys.argv[2:]
    if role == "a":
        service_a(int(args[0]), int(args[1]), int(args[2]), args[3])
    elif role == "b":
        service_b(int(args[0]))
    elif role == "c":
        service_c(int(args[0]))
    elif role == "d":
        service_d(int(args[0]), int(args[1]))
    elif role == "drive":
        drive(int(args[0]), int(args[1]), int(args[2]), *args[3:4])
    else:
        sys.exit(f"unknown role {role}")
