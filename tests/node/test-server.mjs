#!/usr/bin/env node
// test-server.mjs — a small MCP server built on the official SDK, for the proxy's transport
// tests: it records every message that reaches it, and some of its tools ask the client
// back (sampling, roots, elicitation) and return what the client answered.
//
//   node test-server.mjs --stdio                 stdio (one session)
//   node test-server.mjs --http [--port N]       Streamable HTTP at /mcp (stateful sessions, GET streams)
//   node test-server.mjs --sse  [--port N]       the 2024-11-05 HTTP+SSE transport: GET /sse opens a
//                                                session (first event `endpoint`), POST /messages?sessionId=
//   --record FILE (env TEST_SERVER_RECORD)       append one JSON line per event (below)
//   --get-delay MS                               (--http) handle each GET /mcp only after MS ms: a slow
//                                                upstream, whose GET stream opens late (default 0)
//   --no-get-stream                              (--http) answer GET /mcp with 405, as servers without a
//                                                GET stream do (after --get-delay)
//
// HTTP modes print `LISTENING <port>` as their first stdout line and listen on 127.0.0.1.
// Anything else (POST /sse, GET /messages, other paths) gets 404, as the SDK's examples do.
//
// Record lines: {"kind":"post","path","body"} (the raw body of every POST, HTTP modes),
// {"kind":"open","session"} / {"kind":"closed","session"} (an HTTP session or
// SSE connection began / ended), {"kind":"message","session","message"} (every JSON-RPC message
// the transport handed to the server, before it was handled), {"kind":"call","session","tool",
// "args"} (a tool handler ran).
//
// Tools: echo {text}, start-pod {podId}, delete-pod {podId}, secret-tool {}, and, answered with
// what the client said: ask {prompt, via?} (sampling/createMessage), roots {via?} (roots/list),
// elicit {message, via?} (elicitation/create). `via: "post"` (default) sends the request tied to
// the tool call (on the POST's SSE stream over Streamable HTTP); `via: "get"` sends it unrelated,
// on the session's GET stream (retried until that stream is open, for up to 10 s); `via:
// "get-once"` sends it there once, without retrying, as servers that ask the client back
// unprompted do (the SDK drops it when the GET stream is not open yet, and the call then hangs
// until the request times out after 30 s). Over stdio and HTTP+SSE there is only one stream
// either way.

import { appendFileSync } from 'node:fs';
import http from 'node:http';
import { randomUUID } from 'node:crypto';
import { Server } from '@modelcontextprotocol/sdk/server/index.js';
import { StdioServerTransport } from '@modelcontextprotocol/sdk/server/stdio.js';
import { StreamableHTTPServerTransport } from '@modelcontextprotocol/sdk/server/streamableHttp.js';
import { SSEServerTransport } from '@modelcontextprotocol/sdk/server/sse.js';
import {
  CallToolRequestSchema,
  ListToolsRequestSchema,
  CreateMessageResultSchema,
  ListRootsResultSchema,
  ElicitResultSchema,
  ErrorCode,
  McpError,
  isInitializeRequest,
} from '@modelcontextprotocol/sdk/types.js';

function usage(msg) {
  if (msg) process.stderr.write(`test-server: ${msg}\n`);
  process.stderr.write(
    'usage: node test-server.mjs (--stdio | --http | --sse) [--port N] [--record FILE] [--get-delay MS] [--no-get-stream]\n',
  );
  process.exit(1);
}

const opts = { port: 0, record: process.env.TEST_SERVER_RECORD, getDelay: 0, getStream: true };
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  const next = () => (i + 1 < process.argv.length ? process.argv[++i] : usage(`${a} needs a value`));
  if (a === '--stdio' || a === '--http' || a === '--sse') opts.mode = a.slice(2);
  else if (a === '--port') opts.port = Number(next());
  else if (a === '--record') opts.record = next();
  else if (a === '--get-delay') opts.getDelay = Number(next());
  else if (a === '--no-get-stream') opts.getStream = false;
  else usage(`unknown argument ${JSON.stringify(a)}`);
}
if (!opts.mode) usage('give --stdio, --http or --sse');
if (!Number.isFinite(opts.getDelay) || opts.getDelay < 0) usage('--get-delay needs a number of milliseconds');

function record(entry) {
  if (opts.record) appendFileSync(opts.record, JSON.stringify(entry) + '\n');
}

const TOOLS = [
  { name: 'echo', description: 'Echoes text.', inputSchema: { type: 'object', properties: { text: { type: 'string' } } } },
  { name: 'start-pod', description: 'Starts a pod.', inputSchema: { type: 'object', properties: { podId: { type: 'string' } } } },
  { name: 'delete-pod', description: 'Deletes a pod.', inputSchema: { type: 'object', properties: { podId: { type: 'string' } } } },
  { name: 'secret-tool', description: 'Hidden by the tests\' policies.', inputSchema: { type: 'object', properties: {} } },
  {
    name: 'ask',
    description: 'Asks the client to sample a message; returns its answer.',
    inputSchema: { type: 'object', properties: { prompt: { type: 'string' }, via: { type: 'string' } } },
  },
  { name: 'roots', description: 'Lists the client\'s roots.', inputSchema: { type: 'object', properties: { via: { type: 'string' } } } },
  {
    name: 'elicit',
    description: 'Asks the client (its user) for input.',
    inputSchema: { type: 'object', properties: { message: { type: 'string' }, via: { type: 'string' } } },
  },
];

/** Sends a server→client request, tied to the tool call (`post`) or on the GET stream (`get`). */
async function askClient(server, extra, request, schema, via) {
  if (via === 'get-once') return server.request(request, schema, { timeout: 30000 });
  if (via !== 'get') return extra.sendRequest(request, schema, { timeout: 30000 });
  // An unrelated request goes on the GET stream; over Streamable HTTP the SDK drops it while
  // that stream is not open yet, so retry with a short timeout.
  const deadline = Date.now() + 10000;
  for (;;) {
    try {
      return await server.request(request, schema, { timeout: 500 });
    } catch (e) {
      if (!(e instanceof McpError) || e.code !== ErrorCode.RequestTimeout || Date.now() > deadline) throw e;
    }
  }
}

function text(t) {
  return { content: [{ type: 'text', text: t }] };
}

function newServer(session) {
  const server = new Server({ name: 'toolgate-test-server', version: '1.0.0' }, { capabilities: { tools: {} } });
  server.setRequestHandler(ListToolsRequestSchema, async () => ({ tools: TOOLS }));
  server.setRequestHandler(CallToolRequestSchema, async (req, extra) => {
    const { name, arguments: args = {} } = req.params;
    record({ kind: 'call', session: session(), tool: name, args });
    switch (name) {
      case 'echo':
        return text(`echo: ${args.text ?? ''}`);
      case 'start-pod':
        return text(`started ${args.podId}`);
      case 'delete-pod':
        return text(`deleted ${args.podId}`);
      case 'secret-tool':
        return text('secret');
      case 'ask': {
        const r = await askClient(
          server,
          extra,
          {
            method: 'sampling/createMessage',
            params: { messages: [{ role: 'user', content: { type: 'text', text: String(args.prompt ?? '') } }], maxTokens: 50 },
          },
          CreateMessageResultSchema,
          args.via,
        );
        return text(`sampled: ${r.content?.text ?? JSON.stringify(r.content)} (model ${r.model})`);
      }
      case 'roots': {
        const r = await askClient(server, extra, { method: 'roots/list' }, ListRootsResultSchema, args.via);
        return text(`roots: ${r.roots.map((x) => x.uri).join(',')}`);
      }
      case 'elicit': {
        const r = await askClient(
          server,
          extra,
          {
            method: 'elicitation/create',
            params: {
              message: String(args.message ?? 'your name?'),
              requestedSchema: { type: 'object', properties: { name: { type: 'string' } }, required: ['name'] },
            },
          },
          ElicitResultSchema,
          args.via,
        );
        return text(`elicited: ${r.action} ${JSON.stringify(r.content ?? null)}`);
      }
      default:
        throw new McpError(ErrorCode.InvalidParams, `unknown tool ${name}`);
    }
  });
  return server;
}

/** Records every message the transport hands to the server. */
function tap(transport, session) {
  const handler = transport.onmessage;
  transport.onmessage = (message, extra) => {
    record({ kind: 'message', session: session(), message });
    handler?.(message, extra);
  };
}

/** Reads a POST body, records it raw (`{"kind":"post","path","body"}`), and parses it;
 * undefined (after answering 400) when it is not JSON. */
async function readJson(req, res, path) {
  const chunks = [];
  for await (const c of req) chunks.push(c);
  const body = Buffer.concat(chunks).toString('utf8');
  record({ kind: 'post', path, body });
  try {
    return JSON.parse(body);
  } catch {
    res.writeHead(400, { 'content-type': 'text/plain' }).end('not JSON');
    return undefined;
  }
}

function notFound(res) {
  res.writeHead(404, { 'content-type': 'text/plain' }).end('not found');
}

function listen(handler) {
  const srv = http.createServer((req, res) => {
    handler(req, res).catch((e) => {
      process.stderr.write(`test-server: ${e?.stack ?? e}\n`);
      if (!res.headersSent) res.writeHead(500).end(String(e));
    });
  });
  srv.listen(opts.port, '127.0.0.1', () => process.stdout.write(`LISTENING ${srv.address().port}\n`));
}

if (opts.mode === 'stdio') {
  const transport = new StdioServerTransport();
  const server = newServer(() => 'stdio');
  await server.connect(transport);
  tap(transport, () => 'stdio');
} else if (opts.mode === 'http') {
  const sessions = new Map();
  listen(async (req, res) => {
    const url = new URL(req.url, 'http://127.0.0.1');
    if (url.pathname !== '/mcp') return notFound(res);
    const sid = req.headers['mcp-session-id'];
    if (req.method === 'POST') {
      const body = await readJson(req, res, url.pathname);
      if (body === undefined) return;
      let transport = sid ? sessions.get(sid) : undefined;
      if (!transport) {
        if (sid || !isInitializeRequest(body)) {
          return res.writeHead(sid ? 404 : 400, { 'content-type': 'application/json' }).end(
            JSON.stringify({ jsonrpc: '2.0', id: null, error: { code: -32000, message: 'no such session' } }),
          );
        }
        transport = new StreamableHTTPServerTransport({
          sessionIdGenerator: () => randomUUID(),
          onsessioninitialized: (id) => {
            sessions.set(id, transport);
            record({ kind: 'open', session: id });
          },
        });
        transport.onclose = () => {
          if (transport.sessionId) {
            sessions.delete(transport.sessionId);
            record({ kind: 'closed', session: transport.sessionId });
          }
        };
        await newServer(() => transport.sessionId).connect(transport);
        tap(transport, () => transport.sessionId);
      }
      return transport.handleRequest(req, res, body);
    }
    if (req.method === 'GET' && opts.getDelay > 0) await new Promise((r) => setTimeout(r, opts.getDelay));
    const transport = sid ? sessions.get(sid) : undefined;
    if (!transport) return res.writeHead(sid ? 404 : 400).end('no such session');
    if (req.method === 'GET' && !opts.getStream) {
      return res.writeHead(405, { allow: 'POST, DELETE', 'content-type': 'text/plain' }).end('no GET stream');
    }
    return transport.handleRequest(req, res);
  });
} else {
  const sessions = new Map();
  listen(async (req, res) => {
    const url = new URL(req.url, 'http://127.0.0.1');
    if (req.method === 'GET' && url.pathname === '/sse') {
      const transport = new SSEServerTransport('/messages', res);
      const id = transport.sessionId;
      sessions.set(id, transport);
      record({ kind: 'open', session: id });
      res.on('close', () => {
        sessions.delete(id);
        record({ kind: 'closed', session: id });
      });
      await newServer(() => id).connect(transport);
      tap(transport, () => id);
      return;
    }
    if (req.method === 'POST' && url.pathname === '/messages') {
      const transport = sessions.get(url.searchParams.get('sessionId') ?? '');
      const body = await readJson(req, res, url.pathname + url.search);
      if (body === undefined) return;
      if (!transport) return res.writeHead(404).end('unknown session');
      return transport.handlePostMessage(req, res, body);
    }
    return notFound(res);
  });
}
