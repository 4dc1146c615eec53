#!/usr/bin/env node
// mcp-client.mjs — a scriptable MCP client built on the official TypeScript SDK.
//
//   node mcp-client.mjs --url http://127.0.0.1:PORT/mcp [--header 'Authorization: Bearer x']...
//   node mcp-client.mjs --stdio -- CMD ARGS...
//
// Options (before `--`):
//   --url URL            Streamable HTTP endpoint
//   --header 'K: V'      extra HTTP header (repeatable; HTTP only)
//   --stdio -- CMD ...   spawn CMD as a stdio MCP server; it inherits this process's full
//                        environment (the SDK would otherwise pass only HOME/PATH/...)
//   --timeout MS         default per-request timeout (default 60000)
//   --name NAME          clientInfo.name sent in initialize (default toolgate-test-client)
//   --quiet-stderr       drop the stdio child's stderr instead of inheriting it
//
// stdin: a JSON array of steps (a single object is treated as a one-step script):
//   {"op":"list"}                               tools/list (all pages)
//   {"op":"call","tool":"start-pod","args":{}}  tools/call
//   {"op":"request","method":"resources/list","params":{}}   any request, raw result
//   {"op":"notify","method":"notifications/x","params":{}}   a notification
//   {"op":"ping"} | {"op":"info"} | {"op":"sleep","ms":100}
// Any step may carry "timeout_ms" and "id" (echoed back).
//
// stdout: one JSON line per step:
//   {"step":0,"op":"call","ok":true,"result":{...}}
//   {"step":1,"op":"call","ok":false,"error":{"kind":"jsonrpc","code":-32001,"message":"..","data":..}}
// error.kind is "jsonrpc" (a JSON-RPC error from the server, code/message/data as sent),
// "http" (a non-2xx HTTP answer; code is the HTTP status, and when the body was a
// JSON-RPC error its code/message/data are reported instead with http_status set),
// "timeout" (the step's timeout_ms / --timeout passed; the request is cancelled),
// "transport" (connection failures, unparsable answers) or "client" (a bad step).
// Exit status: 0 when the script ran (whatever the steps' outcomes); 1 for bad usage or
// a bad script; 2 when the connection/initialize failed (one line with "op":"connect").
// Every line is written out before the process exits, also when stdout is a pipe.

import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';
import { StreamableHTTPClientTransport, StreamableHTTPError } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { McpError, ErrorCode, ResultSchema } from '@modelcontextprotocol/sdk/types.js';

function usage(msg) {
  if (msg) process.stderr.write(`mcp-client: ${msg}\n`);
  process.stderr.write(
    "usage: node mcp-client.mjs (--url URL [--header 'K: V']... | --stdio -- CMD ARGS...) [--timeout MS] < script.json\n",
  );
  process.exit(1);
}

function parseArgs(argv) {
  const opts = { headers: {}, timeout: 60000, name: 'toolgate-test-client', quietStderr: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) usage(`${a} needs a value`);
      return argv[++i];
    };
    if (a === '--url') opts.url = next();
    else if (a === '--header') {
      const h = next();
      const idx = h.indexOf(':');
      if (idx <= 0) usage(`bad header ${JSON.stringify(h)} (want 'Name: value')`);
      opts.headers[h.slice(0, idx).trim()] = h.slice(idx + 1).trim();
    } else if (a === '--timeout') {
      opts.timeout = Number(next());
      if (!Number.isFinite(opts.timeout) || opts.timeout <= 0) usage('bad --timeout');
    } else if (a === '--name') opts.name = next();
    else if (a === '--quiet-stderr') opts.quietStderr = true;
    else if (a === '--stdio') opts.stdio = true;
    else if (a === '--') {
      opts.command = argv.slice(i + 1);
      break;
    } else if (a === '-h' || a === '--help') usage();
    else usage(`unknown argument ${JSON.stringify(a)}`);
  }
  if (opts.stdio) {
    if (!opts.command || opts.command.length === 0) usage('--stdio needs -- CMD ARGS...');
    if (opts.url) usage('--url and --stdio are exclusive');
  } else if (!opts.url) usage('one of --url or --stdio is required');
  return opts;
}

async function readStdin() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return Buffer.concat(chunks).toString('utf8');
}

const MCP_PREFIX = /^MCP error -?\d+: /;
let connectionClosed = false;

/** Raised when a step exceeds its timeout; enforced here rather than by the SDK, whose
 * timeout error uses code -32001 and so could not be told apart from a server error. */
class LocalTimeout extends Error {
  constructor(ms) {
    super(`Request timed out after ${ms} ms`);
    this.ms = ms;
  }
}

/** Turn anything thrown by the SDK into a plain JSON error object. */
function describeError(err) {
  if (err instanceof LocalTimeout) {
    return { kind: 'timeout', code: null, message: err.message, data: { timeout_ms: err.ms } };
  }
  if (err instanceof McpError && connectionClosed && err.code === ErrorCode.ConnectionClosed && err.data === undefined) {
    // raised by the SDK itself when the transport closed (e.g. the stdio child exited)
    return { kind: 'transport', code: err.code, message: String(err.message).replace(MCP_PREFIX, '') };
  }
  if (err instanceof McpError) {
    // Timeouts are enforced locally (LocalTimeout), so every McpError here came from the
    // server, even one with code -32001 (the SDK's own RequestTimeout code).
    const out = {
      kind: 'jsonrpc',
      code: err.code,
      message: String(err.message).replace(MCP_PREFIX, ''),
    };
    if (err.data !== undefined) out.data = err.data;
    return out;
  }
  if (err instanceof StreamableHTTPError) {
    const out = { kind: 'http', code: err.code, message: err.message };
    // The body of a non-2xx answer ends up in the message; if it is a JSON-RPC error
    // response (or a plain {"error": ...} object) surface its fields.
    const m = /^Streamable HTTP error: Error POSTing to endpoint: ([\s\S]*)$/.exec(err.message);
    if (m) {
      out.body = m[1];
      try {
        const body = JSON.parse(m[1]);
        if (body && typeof body === 'object' && body.error && typeof body.error === 'object' && 'code' in body.error) {
          return {
            kind: 'jsonrpc',
            http_status: err.code,
            code: body.error.code,
            message: body.error.message,
            ...(body.error.data !== undefined ? { data: body.error.data } : {}),
          };
        }
        out.body = body;
      } catch {
        /* not JSON: keep the text */
      }
    }
    return out;
  }
  const out = { kind: 'transport', code: null, message: err instanceof Error ? err.message : String(err) };
  if (err && typeof err === 'object' && 'code' in err && err.code !== undefined) out.code = err.code;
  if (err instanceof Error && err.cause) out.cause = String(err.cause?.message ?? err.cause);
  return out;
}

// Resolves once everything written to stdout so far has been handed to the OS. When stdout
// is a pipe whose buffer is full (64 KiB on Linux), Node queues the rest and writes it
// asynchronously; process.exit() would drop it, so every exit waits for this first.
let flushed = Promise.resolve();

function emit(obj) {
  const line = JSON.stringify(obj) + '\n';
  // Write callbacks run in order, so the last one settles after all earlier data is out.
  flushed = new Promise((resolve) => {
    process.stdout.write(line, () => resolve());
  });
}

/** Exit once stdout has been written out (an error such as EPIPE also settles it). */
async function exit(code) {
  await flushed;
  process.exit(code);
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));

  let script;
  try {
    const text = await readStdin();
    script = text.trim() === '' ? [] : JSON.parse(text);
  } catch (e) {
    usage(`stdin is not valid JSON: ${e.message}`);
  }
  if (!Array.isArray(script)) script = [script];
  for (const [i, step] of script.entries()) {
    if (!step || typeof step !== 'object' || typeof step.op !== 'string') usage(`step ${i} has no "op"`);
  }

  let transport;
  if (opts.stdio) {
    const [command, ...args] = opts.command;
    transport = new StdioClientTransport({
      command,
      args,
      env: Object.fromEntries(Object.entries(process.env).filter(([, v]) => v !== undefined)),
      stderr: opts.quietStderr ? 'ignore' : 'inherit',
    });
  } else {
    let url;
    try {
      url = new URL(opts.url);
    } catch {
      usage(`bad --url ${JSON.stringify(opts.url)}`);
    }
    transport = new StreamableHTTPClientTransport(url, { requestInit: { headers: opts.headers } });
  }

  // Transport-level errors (e.g. a dropped SSE stream) are reported per request; log the rest.
  transport.onerror = (e) => process.stderr.write(`mcp-client: transport error: ${e?.message ?? e}\n`);

  const client = new Client({ name: opts.name, version: '1.0.0' }, { capabilities: {} });
  client.onclose = () => {
    connectionClosed = true;
  };
  try {
    await client.connect(transport, { timeout: opts.timeout });
  } catch (e) {
    emit({ step: null, op: 'connect', ok: false, error: describeError(e) });
    await client.close().catch(() => {});
    await exit(2);
  }

  for (const [i, step] of script.entries()) {
    const base = { step: i, op: step.op };
    if (step.id !== undefined) base.id = step.id;
    if (step.op === 'call') base.tool = step.tool;
    const ms = Number(step.timeout_ms) > 0 ? Number(step.timeout_ms) : opts.timeout;
    const ac = new AbortController();
    const timer = setTimeout(() => ac.abort(new LocalTimeout(ms)), ms);
    // The SDK's own timeout is pushed past ours; aborting cancels the request (the SDK
    // sends notifications/cancelled) and rejects it with our LocalTimeout.
    const reqOpts = { timeout: ms + 60000, signal: ac.signal };
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
          if (typeof step.tool !== 'string') throw Object.assign(new Error('call step needs "tool"'), { clientError: true });
          // client.request() instead of client.callTool() so that the result is passed
          // through unchanged (callTool validates structuredContent against cached schemas).
          result = await client.request(
            { method: 'tools/call', params: { name: step.tool, arguments: step.args ?? {} } },
            ResultSchema, // loose: every field of the result is kept
            reqOpts,
          );
          break;
        case 'request':
          if (typeof step.method !== 'string') throw Object.assign(new Error('request step needs "method"'), { clientError: true });
          result = await client.request(
            { method: step.method, ...(step.params !== undefined ? { params: step.params } : {}) },
            ResultSchema,
            reqOpts,
          );
          break;
        case 'notify':
          await client.notification({ method: step.method, ...(step.params !== undefined ? { params: step.params } : {}) });
          result = {};
          break;
        case 'ping':
          result = await client.ping(reqOpts);
          break;
        case 'info':
          result = {
            serverInfo: client.getServerVersion() ?? null,
            capabilities: client.getServerCapabilities() ?? null,
            instructions: client.getInstructions() ?? null,
          };
          break;
        case 'sleep':
          await new Promise((r) => setTimeout(r, Math.max(0, Number(step.ms) || 0)));
          result = {};
          break;
        default:
          throw Object.assign(new Error(`unknown op ${JSON.stringify(step.op)}`), { clientError: true });
      }
      emit({ ...base, ok: true, result });
    } catch (e) {
      // The SDK wraps an abort reason into McpError(-32001, String(reason)): look at the signal.
      const cause = ac.signal.aborted && ac.signal.reason instanceof LocalTimeout ? ac.signal.reason : e;
      const error = cause?.clientError ? { kind: 'client', code: null, message: cause.message } : describeError(cause);
      emit({ ...base, ok: false, error });
    } finally {
      clearTimeout(timer);
    }
  }

  await client.close().catch(() => {});
  // A stdio child that ignores stdin EOF must not keep us alive; stdout is written out first.
  await exit(0);
}

main().catch(async (e) => {
  process.stderr.write(`mcp-client: ${e?.stack ?? e}\n`);
  await exit(1);
});
