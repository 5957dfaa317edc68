"""gRPC client for the integration tests, driven over stdin/stdout.

Usage: grpc_client.py PORT. Opens ONE channel to 127.0.0.1:PORT (kept open across
commands), prints "ready" once it is connected, then for each stdin line
"<call> <traceparent or ->" with call in unary, sstream, cstream, bidi, fail, crash
makes that call on demo.Echo and prints "<STATUS NAME> <responses received>".
"""
import sys

import grpc

PORT = int(sys.argv[1])
channel = grpc.insecure_channel(f"127.0.0.1:{PORT}", options=[("grpc.enable_http_proxy", 0)])
grpc.channel_ready_future(channel).result(timeout=20)

M = "/demo.Echo/"
unary = channel.unary_unary(M + "Unary")
sstream = channel.unary_stream(M + "ServerStream")
cstream = channel.stream_unary(M + "ClientStream")
bidi = channel.stream_stream(M + "Bidi")
fail = channel.unary_unary(M + "Fail")
crash = channel.unary_unary(M + "Crash")

print("ready", flush=True)
for line in sys.stdin:
    parts = line.split()
    if not parts:
        continue
    call = parts[0]
    tp = parts[1] if len(parts) > 1 else "-"
    md = [("traceparent", tp)] if tp != "-" else None
    try:
        if call == "unary":
            n = len([unary(b"ping", metadata=md, timeout=10)])
        elif call == "sstream":
            n = len(list(sstream(b"ping", metadata=md, timeout=10)))
        elif call == "cstream":
            n = len([cstream(iter([b"a", b"b", b"c"]), metadata=md, timeout=10)])
        elif call == "bidi":
            n = len(list(bidi(iter([b"a", b"b", b"c"]), metadata=md, timeout=10)))
        elif call == "fail":
            n = len([fail(b"ping", metadata=md, timeout=10)])
        elif call == "crash":
            n = len([crash(b"ping", metadata=md, timeout=10)])
        else:
            print(f"ERROR unknown call {call}", flush=True)
            continue
        print(f"OK {n}", flush=True)
    except grpc.RpcError as e:
        print(f"{e.code().name} 0", flush=True)
channel.close()
