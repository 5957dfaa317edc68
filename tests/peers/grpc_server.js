// gRPC server for the integration tests on @grpc/grpc-js: demo.Echo/Unary (echo) and
// demo.Echo/Fail (NOT_FOUND "nope"). Usage: node grpc_server.js PORT.
// Prints "ready" once listening, then "<Method> <traceparent or ->" per call.
const grpc = require('@grpc/grpc-js');
const port = process.argv[2];
const raw = (path) => ({path, requestStream: false, responseStream: false,
  requestSerialize: (x) => x, requestDeserialize: (x) => x,
  responseSerialize: (x) => x, responseDeserialize: (x) => x});
const log = (m, call) => {
  const tp = call.metadata.get('traceparent');
  console.log(`${m} ${tp.length ? tp[0] : '-'}`);
};
const server = new grpc.Server();
server.addService({Unary: raw('/demo.Echo/Unary'), Fail: raw('/demo.Echo/Fail')}, {
  Unary: (call, cb) => { log('Unary', call); cb(null, call.request); },
  Fail: (call, cb) => { log('Fail', call); cb({code: grpc.status.NOT_FOUND, details: 'nope'}); },
});
server.bindAsync(`127.0.0.1:${port}`, grpc.ServerCredentials.createInsecure(), (err) => {
  if (err) { console.error(err); process.exit(1); }
  console.log('ready');
});
