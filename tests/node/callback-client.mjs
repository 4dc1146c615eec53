#!/usr/bin/env node
// callback-client.mjs — a scripted MCP client (official SDK) that also answers the server's
// requests to the client (sampling, roots, elicitation), over Streamable HTTP, the 2024-11-05
// HTTP+SSE transport, or stdio.
//
//   node callback-client.mjs --url http://127.0.0.1:PORT/mcp [--header 'K: V']... [answers] < script.json
//   node callback-client.mjs --sse http://127.0.0.1:PORT/sse [--header 'K: V']... [answers] < script.json
//   node callback-client.mjs --stdio [answers] -- CMD ARGS... < script.json
//
// answers (each also declares the capability in initialize):
//   --sampling TEXT     answer sampling/createMessage with {role: assistant, content: {type: text,
//                       text: "TEXT <- PROMPT"}, model: "callback-model"} (PROMPT: the request's
//                       first message text)
//   --roots URI,...     answer roots/list with these roots
//   --elicit JSON       answer elicitation/create with {action: "accept", content: JSON}
//   --timeout MS        per-request timeout (default 30000)
//   --rounds N          run the script N times in a row, each in a new session (see below)
//   --max-failed K      with --rounds: stop after K failed rounds
//
// stdin: a JSON array of steps, as mcp-client.mjs: {"op":"list"}, {"op":"call","tool":T,"args":{}},
// {"op":"request","method":M,"params":{}}, {"op":"notify","method":M,"params":{}}, {"op":"ping"}.
// stdout: one JSON line per step ({"step","op","ok","result"|"error"}; error.kind "jsonrpc" with
// code/message/data as the server sent them, "http" (code = HTTP status) or "transport"), then
// one line {"op":"served","requests":[{"method","params"}...]} with every request of the server
// this client answered, in order. Exit 0 once the script ran; 2 when connecting failed (one line
// {"op":"connect","ok":false,"error"}).
//
// With --rounds N, stdout is instead one line per session {"op":"round","round","ok","ms","steps",
// "served"} (`ok`: connected and every step ok; `steps`: the step lines above, `served`: the
// requests answered in that session), then {"op":"rounds","run","failed"}; exit 0.

import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';
import { SSEClientTransport } from '@modelcontextprotocol/sdk/client/sse.js';
import { StreamableHTTPClientTransport, StreamableHTTPError } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import {
  CreateMessageRequestSchema,
  ElicitRequestSchema,
  ListRootsRequestSchema,
  McpError,
  ResultSchema,
} from '@modelcontextprotocol/sdk/types.js';

function usage(msg) {
  if (msg) process.stderr.write(`callback-client: ${msg}\n`);
  process.stderr.write(
    'usage: node callback-client.mjs (--url URL | --sse URL | --stdio -- CMD...) [--header K:V]... [--sampling T] [--roots U,..] [--elicit JSON] < script.json\n',
  );
  process.exit(1);
}

const opts = { headers: {}, timeout: 30000 };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i++) {
  const a = argv[i];
  const next = () => (i + 1 < argv.length ? argv[++i] : usage(`${a} needs a value`));
  if (a === '--url') opts.url = next();
  else if (a === '--sse') opts.sse = next();
  else if (a === '--stdio') opts.stdio = true;
  else if (a === '--header') {
    const h = next();
    const idx = h.indexOf(':');
    if (idx <= 0) usage(`bad header ${JSON.stringify(h)}`);
    opts.headers[h.slice(0, idx).trim()] = h.slice(idx + 1).trim();
  } else if (a === '--sampling') opts.sampling = next();
  else if (a === '--roots') opts.roots = next().split(',').filter(Boolean);
  else if (a === '--elicit') {
    try {
      opts.elicit = JSON.parse(next());
    } catch {
      usage('--elicit needs JSON');
    }
  } else if (a === '--timeout') opts.timeout = Number(next());
  else if (a === '--rounds') opts.rounds = Number(next());
  else if (a === '--max-failed') opts.maxFailed = Number(next());
  else if (a === '--') {
    opts.command = argv.slice(i + 1);
    break;
  } else usage(`unknown argument ${JSON.stringify(a)}`);
}
if ([opts.url, opts.sse, opts.stdio].filter(Boolean).length !== 1) usage('give one of --url, --sse, --stdio');
if (opts.stdio && !opts.command?.length) usage('--stdio needs -- CMD ARGS...');
for (const k of ['timeout', 'rounds', 'maxFailed']) {
  if (opts[k] !== undefined && !(Number.isInteger(opts[k]) && opts[k] > 0)) usage(`--${k} needs a positive integer`);
}

let flushed = Promise.resolve();
function emit(obj) {
  const line = JSON.stringify(obj) + '\n';
  flushed = new Promise((resolve) => process.stdout.write(line, () => resolve()));
}
async function exit(code) {
  await flushed;
  process.exit(code);
}

function describeError(err) {
  if (err instanceof McpError) {
    const out = { kind: 'jsonrpc', code: err.code, message: String(err.message).replace(/^MCP error -?\d+: /, '') };
    if (err.data !== undefined) out.data = err.data;
    return out;
  }
  if (err instanceof StreamableHTTPError) {
    const out = { kind: 'http', code: err.code, message: err.message };
    const m = /Error POSTing to endpoint: ([\s\S]*)$/.exec(err.message);
    if (m) {
      try {
        const body = JSON.parse(m[1]);
        if (body?.error && typeof body.error === 'object') return { kind: 'jsonrpc', http_status: err.code, ...body.error };
      } catch {
        /* keep the text */
      }
    }
    return out;
  }
  // SSEClientTransport: "Error POSTing to endpoint (HTTP 400): BODY"
  const m = /Error POSTing to endpoint \(HTTP (\d+)\): ([\s\S]*)$/.exec(err?.message ?? '');
  if (m) {
    const status = Number(m[1]);
    try {
      const body = JSON.parse(m[2]);
      if (body?.error && typeof body.error === 'object') return { kind: 'jsonrpc', http_status: status, ...body.error };
    } catch {
      /* keep the text */
    }
    return { kind: 'http', code: status, message: m[2] };
  }
  return { kind: 'transport', code: err?.code ?? null, message: err instanceof Error ? err.message : String(err) };
}

/** One MCP session: connects, runs the script, closes. `out(obj)` gets each step line; returns
 * the server requests this client answered, or null when connecting failed. */
async function session(script, out) {
  let transport;
  if (opts.stdio) {
    const [command, ...args] = opts.command;
    transport = new StdioClientTransport({
      command,
      args,
      env: Object.fromEntries(Object.entries(process.env).filter(([, v]) => v !== undefined)),
      stderr: 'inherit',
    });
  } else if (opts.sse) {
    transport = new SSEClientTransport(new URL(opts.sse), { requestInit: { headers: opts.headers } });
  } else {
    transport = new StreamableHTTPClientTransport(new URL(opts.url), { requestInit: { headers: opts.headers } });
  }
  let closing = false;
  // Closing aborts the session's streams: not worth a line.
  transport.onerror = (e) => closing || process.stderr.write(`callback-client: transport error: ${e?.message ?? e}\n`);

  const capabilities = {};
  if (opts.sampling !== undefined) capabilities.sampling = {};
  if (opts.roots !== undefined) capabilities.roots = { listChanged: false };
  if (opts.elicit !== undefined) capabilities.elicitation = {};
  const client = new Client({ name: 'toolgate-callback-client', version: '1.0.0' }, { capabilities });
  const served = [];
  if (opts.sampling !== undefined) {
    client.setRequestHandler(CreateMessageRequestSchema, async (req) => {
      served.push({ method: req.method, params: req.params });
      const prompt = req.params.messages?.[0]?.content?.text ?? '';
      return { role: 'assistant', content: { type: 'text', text: `${opts.sampling} <- ${prompt}` }, model: 'callback-model' };
    });
  }
  if (opts.roots !== undefined) {
    client.setRequestHandler(ListRootsRequestSchema, async (req) => {
      served.push({ method: req.method, params: req.params ?? null });
      return { roots: opts.roots.map((uri) => ({ uri })) };
    });
  }
  if (opts.elicit !== undefined) {
    client.setRequestHandler(ElicitRequestSchema, async (req) => {
      served.push({ method: req.method, params: req.params });
      return { action: 'accept', content: opts.elicit };
    });
  }

  try {
    await client.connect(transport, { timeout: opts.timeout });
  } catch (e) {
    out({ step: null, op: 'connect', ok: false, error: describeError(e) });
    closing = true;
    await client.close().catch(() => {});
    return null;
  }

  const reqOpts = { timeout: opts.timeout };
  for (const [i, step] of script.entries()) {
    const base = { step: i, op: step.op };
    if (step.op === 'call') base.tool = step.tool;
    try {
      let result;
      switch (step.op) {
        case 'list': {
          const tools = [];
          let cursor;
          do {
            const page = await client.listTools(cursor ? { cursor } : {}, reqOpts);
            tools.push(...page.tools);
            cursor = page.nextCursor;
          } while (cursor);
          result = { tools };
          break;
        }
        case 'call':
          result = await client.request(
            { method: 'tools/call', params: { name: step.tool, arguments: step.args ?? {} } },
            ResultSchema,
            reqOpts,
          );
          break;
        case 'request':
          result = await client.request({ method: step.method, params: step.params }, ResultSchema, reqOpts);
          break;
        case 'notify':
          await client.notification({ method: step.method, params: step.params });
          result = {};
          break;
        case 'ping':
          result = await client.ping(reqOpts);
          break;
        default:
          throw new Error(`unknown op ${JSON.stringify(step.op)}`);
      }
      out({ ...base, ok: true, result });
    } catch (e) {
      out({ ...base, ok: false, error: describeError(e) });
    }
  }
  closing = true;
  await client.close().catch(() => {});
  return served;
}

async function main() {
  const chunks = [];
  for await (const c of process.stdin) chunks.push(c);
  let script;
  try {
    const t = Buffer.concat(chunks).toString('utf8');
    script = t.trim() === '' ? [] : JSON.parse(t);
  } catch (e) {
    usage(`stdin is not valid JSON: ${e.message}`);
  }
  if (!Array.isArray(script)) script = [script];

  if (opts.rounds === undefined) {
    const served = await session(script, emit);
    if (served === null) await exit(2);
    emit({ op: 'served', requests: served });
    await exit(0);
  }
  let failed = 0;
  let run = 0;
  while (run < opts.rounds && (opts.maxFailed === undefined || failed < opts.maxFailed)) {
    const started = Date.now();
    const steps = [];
    const served = await session(script, (line) => steps.push(line));
    const ok = served !== null && steps.every((s) => s.ok);
    if (!ok) failed++;
    emit({ op: 'round', round: run, ok, ms: Date.now() - started, steps, served: served ?? [] });
    run++;
  }
  emit({ op: 'rounds', run, failed });
  await exit(0);
}

main().catch(async (e) => {
  process.stderr.write(`callback-client: ${e?.stack ?? e}\n`);
  await exit(1);
});
