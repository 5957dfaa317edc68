"""gRPC server for the integration tests: service demo.Echo on raw bytes (no codegen).

Usage: grpc_server.py PORT. Prints "ready" once listening, then one line per call:
"<Method> <traceparent or ->".
"""
import sys
from concurrent import futures

import grpc

PORT = int(sys.argv[1])


def log(method, context):
    md = dict(context.invocation_metadata())
    print(f"{method} {md.get('traceparent', '-')}", flush=True)


def unary(request, context):
    log("Unary", context)
    return request


def server_stream(request, context):
    log("ServerStream", context)
    for i in range(3):
        yield request + b"-" + str(i).encode()


def client_stream(request_iterator, context):
    log("ClientStream", context)
    return b"|".join(request_iterator)


def bidi(request_iterator, context):
    log("Bidi", context)
    for r in request_iterator:
        yield r


def fail(request, context):
    log("Fail", context)
    context.abort(grpc.StatusCode.NOT_FOUND, "nope")


def crash(request, context):
    log("Crash", context)
    context.abort(grpc.StatusCode.INTERNAL, "boom")


handlers = {
    "Unary": grpc.unary_unary_rpc_method_handler(unary),
    "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
    "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
    "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
    "Fail": grpc.unary_unary_rpc_method_handler(fail),
    "Crash": grpc.unary_unary_rpc_method_handler(crash),
}

server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("demo.Echo", handlers),))
if server.add_insecure_port(f"127.0.0.1:{PORT}") != PORT:
    sys.exit(f"could not listen on 127.0.0.1:{PORT}")
server.start()
print("ready", flush=True)
server.wait_for_termination()
