#!/usr/bin/env node
// runpod-http.mjs — serve @runpod/mcp-server 4.0.0 over MCP Streamable HTTP (stateless)
// at http://127.0.0.1:<port>/mcp with the package's own `handleMcpRequest` export.
//
//   node runpod-http.mjs [--port N | N]        (env RUNPOD_HTTP_PORT; default 0 = any free port)
//
// Prints `LISTENING <port>` as the first line on stdout; everything else (the package's
// own console.log request logs included) goes to stderr.
//
// Every request must carry `Authorization: Bearer <key>`: in HTTP mode the server holds no
// key of its own (RUNPOD_API_KEY is ignored) and forwards the caller's bearer token to the
// RunPod API. Point it at fake-runpod.mjs with RUNPOD_API_BASE_URL=http://127.0.0.1:PORT
// (and optionally RUNPOD_SERVERLESS_API_URL / RUNPOD_*_GRAPHQL_URL, see README.md).

import http from 'node:http';

// Keep stdout for the LISTENING line only.
console.log = console.error;
console.info = console.error;

const { handleMcpRequest } = await import('runpod-mcp-4/http');

let port = Number(process.env.RUNPOD_HTTP_PORT ?? 0);
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  if (argv[i] === '--port' || argv[i] === '-p') port = Number(argv[++i]);
  else if (/^\d+$/.test(argv[i])) port = Number(argv[i]);
  else {
    process.stderr.write(`runpod-http: unknown argument ${JSON.stringify(argv[i])}\n`);
    process.exit(1);
  }
}
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  process.stderr.write('runpod-http: bad port\n');
  process.exit(1);
}

const server = http.createServer(async (req, res) => {
  const path = new URL(req.url ?? '/', 'http://127.0.0.1').pathname;
  if (path !== '/mcp') {
    res.writeHead(404, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ error: `not found: ${path} (the MCP endpoint is /mcp)` }));
    return;
  }
  try {
    await handleMcpRequest(req, res);
  } catch (err) {
    process.stderr.write(`runpod-http: ${err?.stack ?? err}\n`);
    if (!res.headersSent) {
      res.writeHead(500, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ jsonrpc: '2.0', error: { code: -32603, message: String(err?.message ?? err) }, id: null }));
    } else res.end();
  }
});

server.on('error', (err) => {
  process.stderr.write(`runpod-http: ${err.message}\n`);
  process.exit(1);
});
server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`LISTENING ${server.address().port}\n`);
});

function shutdown() {
  server.close(() => process.exit(0));
  server.closeAllConnections?.();
  setTimeout(() => process.exit(0), 500).unref();
}
process.on('SIGINT', shutdown);
process.on('SIGTERM', shutdown);
