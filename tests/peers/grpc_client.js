// gRPC client for the integration tests on @grpc/grpc-js, raw Buffers, no codegen.
// Usage: node grpc_client.js PORT METHOD TRACEPARENT|-  (METHOD e.g. Unary, Fail)
// Makes one call on /demo.Echo/METHOD over a fresh channel and prints the status
// name (OK, NOT_FOUND, ...).
const grpc = require('@grpc/grpc-js');
const [port, method, tp] = process.argv.slice(2);
const client = new grpc.Client(`127.0.0.1:${port}`, grpc.credentials.createInsecure(), {'grpc.enable_http_proxy': 0});
const md = new grpc.Metadata();
if (tp && tp !== '-') md.set('traceparent', tp);
const names = Object.fromEntries(Object.entries(grpc.status).map(([k, v]) => [v, k]));
client.makeUnaryRequest(`/demo.Echo/${method}`, (x) => x, (x) => x, Buffer.from('ping'), md, {deadline: Date.now() + 10000}, (err) => {
  console.log(err ? names[err.code] : 'OK');
  client.close();
});
