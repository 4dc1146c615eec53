#!/usr/bin/env node
// The RunPod MCP server (@runpod/mcp-server 4.0.0) over MCP Streamable HTTP, with the
// package's own `handleMcpRequest` export, at http://127.0.0.1:$PORT/mcp (default 3000).
//
// It binds 127.0.0.1 only: in the pod, nothing but the toolgate-proxy sidecar (same network
// namespace) can reach it, so every tool call passes the policy. Callers send their RunPod
// API key as `Authorization: Bearer <key>`; the proxy forwards it and the server uses it
// for the RunPod API (RUNPOD_API_KEY is ignored in HTTP mode).
//
// Prints `LISTENING <port>` as the first stdout line; logs go to stderr. GET /healthz → 200.

import http from 'node:http';
import { handleMcpRequest } from '@runpod/mcp-server/http';

const port = Number(process.env.PORT ?? 3000);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  process.stderr.write(`runpod-mcp: bad PORT ${JSON.stringify(process.env.PORT)}\n`);
  process.exit(1);
}
// The package logs requests with console.log: keep stdout for the LISTENING line.
console.log = console.error;
console.info = console.error;

const server = http.createServer(async (req, res) => {
  const path = new URL(req.url ?? '/', 'http://127.0.0.1').pathname;
  if (path === '/healthz') {
    res.writeHead(200, { 'content-type': 'text/plain' }).end('ok\n');
    return;
  }
  if (path !== '/mcp') {
    res.writeHead(404, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ error: `not found: ${path} (the MCP endpoint is /mcp)` }));
    return;
  }
  try {
    await handleMcpRequest(req, res);
  } catch (err) {
    process.stderr.write(`runpod-mcp: ${err?.stack ?? err}\n`);
    if (!res.headersSent) {
      res.writeHead(500, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ jsonrpc: '2.0', error: { code: -32603, message: 'internal error' }, id: null }));
    } else res.end();
  }
});

server.on('error', (err) => {
  process.stderr.write(`runpod-mcp: ${err.message}\n`);
  process.exit(1);
});
server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`LISTENING ${server.address().port}\n`);
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections?.();
    setTimeout(() => process.exit(0), 2000).unref();
  });
}
