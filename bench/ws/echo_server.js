// The WebSocket upstream for bench/ws_run.py: one Node process, the `ws`
// package, echoing every message back as it came (text stays text, binary
// stays binary).  A plain GET answers 200 "hello world\n" so that the
// benchmark can check that the server (or a proxy in front of it) is serving.
//
//     node bench/ws/echo_server.js PORT
//
// No compression, no pings: the server only echoes.  SIGTERM/SIGINT exit at once.
'use strict';

const http = require('http');
const { WebSocketServer } = require('ws');

const port = Number(process.argv[2]);
if (!Number.isInteger(port) || port <= 0) {
  console.error('usage: node echo_server.js PORT');
  process.exit(2);
}

const BODY = 'hello world\n';
const server = http.createServer((request, response) => {
  response.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': BODY.length });
  response.end(BODY);
});
server.keepAliveTimeout = 60000;

const wss = new WebSocketServer({ server, perMessageDeflate: false, clientTracking: true,
                                  maxPayload: 16 * 1024 * 1024 });
let sessions = 0;
let errors = 0;
wss.on('connection', (socket) => {
  sessions += 1;
  socket._socket.setNoDelay(true);
  socket.on('message', (data, isBinary) => socket.send(data, { binary: isBinary }));
  socket.on('error', (error) => {
    errors += 1;
    if (errors <= 20) console.error(`echo: session error: ${error.message}`);
  });
});
wss.on('error', (error) => console.error(`echo: server error: ${error.message}`));

server.listen({ host: '127.0.0.1', port, backlog: 4096 }, () => {
  console.log(`echo: listening on 127.0.0.1:${port} (ws ${require('ws/package.json').version}, node ${process.version})`);
});

function stop() {
  // (Worded so that bench/ws_run.py does not flag it as a problem unless a session failed.)
  const failed = errors ? `; ${errors} sessions ended by a socket error` : '';
  console.log(`echo: stopping; ${sessions} sessions accepted, ${wss.clients.size} open${failed}`);
  process.exit(0);
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
