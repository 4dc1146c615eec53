// redirect-runpod.mjs — a Node preload that sends @runpod/mcp-server 1.1.0's REST calls to
// a local fake instead of the hard-coded https://rest.runpod.io/v1.
//
//   RUNPOD_API_KEY=k RUNPOD_REDIRECT_URL=http://127.0.0.1:PORT \
//     node --import ./redirect-runpod.mjs node_modules/runpod-mcp-1/dist/index.mjs
//
// 1.1.0 has no base-URL setting: API_BASE_URL is a constant and it calls node-fetch 3,
// which looks up `https.request` on the node:https module object on every request (and
// ignores HTTP(S)_PROXY). This preload replaces `https.request`/`https.get` so that a request
// to a host in RUNPOD_REDIRECT_HOSTS (default rest.runpod.io,api.runpod.io,api.runpod.ai)
// becomes a plain-HTTP request to RUNPOD_REDIRECT_URL with the same path and query
// (so /v1/pods stays /v1/pods; fake-runpod.mjs serves /v1/...). Other requests are untouched.
// Without RUNPOD_REDIRECT_URL the preload does nothing.

import http from 'node:http';
import https from 'node:https';

const target = process.env.RUNPOD_REDIRECT_URL;
if (target) {
  const base = new URL(target);
  if (base.protocol !== 'http:') throw new Error(`RUNPOD_REDIRECT_URL must be http://, got ${target}`);
  const hosts = new Set(
    (process.env.RUNPOD_REDIRECT_HOSTS ?? 'rest.runpod.io,api.runpod.io,api.runpod.ai')
      .split(',')
      .map((h) => h.trim().toLowerCase())
      .filter(Boolean),
  );
  const prefix = base.pathname.replace(/\/+$/, '');

  const rewrite = (args) => {
    // https.request(url[, options][, cb]) | https.request(options[, cb])
    let url;
    let options = {};
    let cb;
    let i = 0;
    if (typeof args[0] === 'string' || args[0] instanceof URL) {
      url = new URL(String(args[0]));
      i = 1;
    }
    if (args[i] && typeof args[i] === 'object') options = args[i++];
    if (typeof args[i] === 'function') cb = args[i];
    const host = (url?.hostname ?? options.hostname ?? options.host ?? '').toLowerCase().replace(/:\d+$/, '');
    if (!hosts.has(host)) return null;
    const path = url ? url.pathname + url.search : (options.path ?? '/');
    const { agent: _agent, host: _h, hostname: _hn, port: _p, protocol: _pr, path: _pa, ...rest } = options;
    const headers = { ...(rest.headers ?? {}) };
    const next = {
      ...rest,
      headers,
      protocol: 'http:',
      hostname: base.hostname,
      port: base.port || 80,
      path: prefix + path,
    };
    return cb ? [next, cb] : [next];
  };

  const origRequest = https.request;
  const origGet = https.get;
  https.request = function request(...args) {
    const r = rewrite(args);
    return r ? http.request(...r) : origRequest.apply(this, args);
  };
  https.get = function get(...args) {
    const r = rewrite(args);
    return r ? http.get(...r) : origGet.apply(this, args);
  };
}
