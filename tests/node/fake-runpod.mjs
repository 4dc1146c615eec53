#!/usr/bin/env node
// fake-runpod.mjs — a fake RunPod API on 127.0.0.1 for tests. Node stdlib only.
//
//   node fake-runpod.mjs [--port N | N] [--host ADDR] [--api-key KEY] [--strict]
//   (--host: the address to listen on, default 127.0.0.1; the node tests use the node's)
//   --exit-with-stdin: exit when standard input reaches its end (the test process that
//   holds the pipe has gone, however it ended)
//   env: FAKE_RUNPOD_PORT, FAKE_RUNPOD_API_KEY, FAKE_RUNPOD_STRICT=1
//
// Prints `LISTENING <port>` as the first (and only) line on stdout once it accepts
// connections (port 0 = pick a free one). Logs go to stderr. Exits on SIGINT/SIGTERM.
//
// What it serves (one port, distinguished by path prefix):
//   /v2/...             REST v2, used by @runpod/mcp-server 4.0.0   (RUNPOD_API_BASE_URL=http://127.0.0.1:PORT)
//   /v1/...             REST v1, used by @runpod/mcp-server 1.1.0   (hard-coded https://rest.runpod.io/v1;
//                                                                    see redirect-runpod.mjs)
//   /runtime/v2/<endpointId>/{run,runsync,status/<job>,stream/<job>,cancel/<job>,retry/<job>,health,purge-queue}
//                       serverless job API                          (RUNPOD_SERVERLESS_API_URL=http://127.0.0.1:PORT/runtime/v2)
//   /graphql            GraphQL: answers `myself { id }` only        (RUNPOD_PUBLIC_GRAPHQL_URL / RUNPOD_AUTHED_GRAPHQL_URL
//                                                                    =http://127.0.0.1:PORT/graphql)
// Control routes (not recorded):
//   GET    /__requests  the recorded request log as a JSON array of
//                       {seq, time, method, path, query, headers:{authorization,content-type,user-agent,accept}, body}
//                       (body: parsed JSON, raw text if not JSON, or null); ?since=SEQ keeps seq > SEQ
//   DELETE /__requests  clears the log (and resets nothing else); answers {"cleared": n}
//   POST   /__faults    add a fault: {"method":"POST","path":"/v2/pods/*","status":500,"body":{..},
//                       "delay_ms":0,"times":1}; path is exact or ends with * (prefix); method optional;
//                       times 0 = forever; status omitted = answer normally after delay_ms
//   GET    /__faults    list faults;  DELETE /__faults  remove all
//   POST   /__reset     clear log, faults and state (back to the seeded resources)
//   GET    /__health    {"ok":true}
//
// Behaviour: every non-control request needs `Authorization: Bearer <token>` (401 otherwise;
// with --api-key the token must equal KEY). Resources live in memory, seeded with a few
// of each kind (pod ids pod-1, pod-2, ...). Unknown ids are materialised on first use
// (lenient, so tests can use any id) unless --strict, where they are 404.

import http from 'node:http';
import { randomUUID } from 'node:crypto';

// ---------------------------------------------------------------- configuration

function parseArgs(argv) {
  const cfg = {
    port: Number(process.env.FAKE_RUNPOD_PORT ?? 0),
    apiKey: process.env.FAKE_RUNPOD_API_KEY || null,
    strict: process.env.FAKE_RUNPOD_STRICT === '1' || process.env.FAKE_RUNPOD_STRICT === 'true',
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--port' || a === '-p') cfg.port = Number(argv[++i]);
    else if (a.startsWith('--port=')) cfg.port = Number(a.slice(7));
    else if (a === '--host') cfg.host = argv[++i];
    else if (a === '--api-key') cfg.apiKey = argv[++i] ?? null;
    else if (a === '--strict') cfg.strict = true;
    else if (a === '--exit-with-stdin') cfg.exitWithStdin = true;
    else if (/^\d+$/.test(a)) cfg.port = Number(a);
    else {
      process.stderr.write(`fake-runpod: unknown argument ${JSON.stringify(a)}\n`);
      process.exit(1);
    }
  }
  if (!Number.isInteger(cfg.port) || cfg.port < 0 || cfg.port > 65535) {
    process.stderr.write('fake-runpod: bad port\n');
    process.exit(1);
  }
  return cfg;
}

const cfg = parseArgs(process.argv.slice(2));
if (cfg.exitWithStdin) {
  process.stdin.on('end', () => process.exit(0));
  process.stdin.on('error', () => process.exit(0));
  process.stdin.resume();
}

// ---------------------------------------------------------------- helpers

class HttpError extends Error {
  constructor(status, message, extra) {
    super(message);
    this.status = status;
    this.extra = extra;
  }
}

const now = () => new Date().toISOString();
let idCounter = 0;
const newId = (prefix) => `${prefix}-${(++idCounter).toString(36)}${randomUUID().slice(0, 6)}`;

function isObject(v) {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

function queryObject(searchParams) {
  const out = {};
  for (const [k, v] of searchParams) {
    if (k in out) out[k] = Array.isArray(out[k]) ? [...out[k], v] : [out[k], v];
    else out[k] = v;
  }
  return out;
}

const MAX_BODY = 4 * 1024 * 1024;

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (c) => {
      size += c.length;
      if (size > MAX_BODY) {
        reject(new HttpError(413, 'request body too large'));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function send(res, status, payload, headers = {}) {
  if (res.headersSent || res.destroyed) return;
  if (status === 204 || payload === undefined) {
    res.writeHead(status, headers);
    res.end();
    return;
  }
  const text = JSON.stringify(payload);
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(text),
    ...headers,
  });
  res.end(text);
}

// ---------------------------------------------------------------- state

const GPU_TYPES = [
  { id: 'NVIDIA GeForce RTX 4090', displayName: 'RTX 4090', memoryInGb: 24, securePrice: 0.69, communityPrice: 0.34 },
  { id: 'NVIDIA RTX A5000', displayName: 'RTX A5000', memoryInGb: 24, securePrice: 0.29, communityPrice: 0.16 },
  { id: 'NVIDIA A100 80GB PCIe', displayName: 'A100 PCIe', memoryInGb: 80, securePrice: 1.64, communityPrice: 1.19 },
  { id: 'NVIDIA H100 80GB HBM3', displayName: 'H100 SXM', memoryInGb: 80, securePrice: 2.99, communityPrice: 2.69 },
];
const CPU_TYPES = [
  { id: 'cpu3c', displayName: 'Compute-Optimized', vcpuCounts: [2, 4, 8, 16, 32], pricePerVcpuHr: 0.03 },
  { id: 'cpu3g', displayName: 'General Purpose', vcpuCounts: [2, 4, 8, 16, 32], pricePerVcpuHr: 0.025 },
];
const DATA_CENTERS = [
  { id: 'US-TX-3', name: 'Texas 3', region: 'NORTH_AMERICA', globalNetwork: true, networkVolumeTypes: ['STANDARD'] },
  { id: 'EU-RO-1', name: 'Romania 1', region: 'EUROPE', globalNetwork: false, networkVolumeTypes: ['STANDARD', 'HIGH_PERFORMANCE'] },
];
const PUBLIC_TEMPLATES = [
  { id: 'runpod-torch-v280', name: 'Runpod Pytorch 2.8.0', image: 'runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404', serverless: false, source: 'official' },
  { id: 'runpod-worker-vllm', name: 'vLLM worker', image: 'runpod/worker-v1-vllm:v2.7.0', serverless: true, source: 'official' },
];

const POD_ACTIONS = {
  RUNNING: ['stop', 'restart', 'terminate'],
  EXITED: ['start', 'terminate'],
  ERROR: ['start', 'terminate'],
  PROVISIONING: ['stop', 'terminate'],
  STARTING: ['stop', 'terminate'],
};

function makePod(id, fields = {}) {
  const gpu = fields.gpu ?? (fields.cpu ? undefined : { id: (fields.gpuTypeIds ?? [GPU_TYPES[0].id])[0], count: fields.gpuCount ?? 1 });
  const pod = {
    id,
    name: fields.name ?? id,
    image: fields.image ?? fields.imageName ?? 'runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404',
    desiredStatus: fields.desiredStatus ?? 'RUNNING',
    cloud: fields.cloud ?? fields.cloudType ?? 'SECURE',
    ...(gpu ? { gpu } : {}),
    ...(fields.cpu ? { cpu: fields.cpu } : {}),
    disk: fields.disk ?? fields.containerDiskInGb ?? 50,
    env: fields.env ?? {},
    ports: fields.ports ?? ['8888/http', '22/tcp'],
    mounts: fields.mounts ?? {},
    dataCenterId: (fields.dataCenterIds ?? ['US-TX-3'])[0],
    costPerHr: 0.69 * (gpu?.count ?? 1),
    locked: false,
    cluster: null,
    createdAt: now(),
    lastStartedAt: now(),
  };
  // copy any other field the caller sent so that get-after-create shows it
  for (const [k, v] of Object.entries(fields)) if (!(k in pod)) pod[k] = v;
  pod.actions = POD_ACTIONS[pod.desiredStatus] ?? [];
  return pod;
}

function makeGeneric(kind, id, fields = {}) {
  const base = { id, name: fields.name ?? id, createdAt: now(), updatedAt: now() };
  switch (kind) {
    case 'endpoints':
      return {
        ...base,
        type: 'QUEUE',
        image: 'runpod/worker-v1-vllm:v2.7.0',
        templateId: null,
        gpu: { pools: ['ADA_24'], count: 1 },
        workers: { min: 0, max: 3, idleTimeout: 10 },
        scaling: { type: 'QUEUE_DELAY', queueDelay: 4 },
        dataCenterIds: ['US-TX-3'],
        flashboot: 'OFF',
        timeout: 300000,
        ...fields,
        id,
      };
    case 'templates':
      return { ...base, image: 'runpod/pytorch:1.0.2-cu1281-torch280-ubuntu2404', serverless: false, public: false, category: 'NVIDIA', ...fields, id };
    case 'networkVolumes':
      return { ...base, size: 50, dataCenterId: fields.dataCenter ?? fields.dataCenterId ?? 'US-TX-3', type: 'STANDARD', ...fields, id };
    case 'registries': {
      // credentials are write-only
      const { username: _u, password: _p, ...rest } = fields;
      return { ...base, ...rest, id };
    }
    case 'delegations':
      return { ...base, resource: 'arn:aws:ecr:us-east-1:000000000000:repository/fake', ...fields, id };
    case 'clusters':
      return {
        ...base,
        type: 'TRAINING',
        compute: { gpuTypeId: GPU_TYPES[3].id, gpuCountPerPod: 8, podCount: 2 },
        pods: { total: 2, byStatus: { RUNNING: 2 } },
        ...fields,
        id,
      };
    default:
      return { ...base, ...fields, id };
  }
}

let state;
function resetState() {
  idCounter = 0;
  state = {
    pods: new Map(),
    endpoints: new Map(),
    templates: new Map(),
    networkVolumes: new Map(),
    registries: new Map(),
    delegations: new Map(),
    clusters: new Map(),
    jobs: new Map(),
    sshKeys: ['ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeFakeFakeFakeFakeFakeFakeFakeFakeFake test@fake'],
  };
  state.pods.set('pod-1', makePod('pod-1', { name: 'trainer', desiredStatus: 'RUNNING' }));
  state.pods.set('pod-2', makePod('pod-2', { name: 'notebook', desiredStatus: 'EXITED' }));
  state.endpoints.set('ep-1', makeGeneric('endpoints', 'ep-1', { name: 'vllm' }));
  state.templates.set('tpl-1', makeGeneric('templates', 'tpl-1', { name: 'my-template' }));
  state.networkVolumes.set('vol-1', makeGeneric('networkVolumes', 'vol-1', { name: 'datasets', size: 100 }));
  state.registries.set('reg-1', makeGeneric('registries', 'reg-1', { name: 'ghcr' }));
  state.delegations.set('del-1', makeGeneric('delegations', 'del-1', { name: 'ecr' }));
  state.clusters.set('cl-1', makeGeneric('clusters', 'cl-1', { name: 'train-cluster' }));
}
resetState();

let requestLog = [];
let seq = 0;
let faults = [];

// Look up a resource; in lenient mode an unknown id is created on the fly.
function lookup(kind, id) {
  const coll = state[kind];
  let item = coll.get(id);
  if (!item) {
    if (cfg.strict) throw new HttpError(404, `${kind} ${id} not found`);
    item = kind === 'pods' ? makePod(id) : makeGeneric(kind, id);
    coll.set(id, item);
  }
  return item;
}

function remove(kind, id) {
  if (!state[kind].delete(id) && cfg.strict) throw new HttpError(404, `${kind} ${id} not found`);
}

function create(kind, body, prefix) {
  if (!isObject(body)) throw new HttpError(400, 'request body must be a JSON object');
  const id = newId(prefix);
  const item = kind === 'pods' ? makePod(id, { ...body, desiredStatus: 'RUNNING' }) : makeGeneric(kind, id, body);
  state[kind].set(id, item);
  return item;
}

function update(kind, id, body) {
  if (!isObject(body)) throw new HttpError(400, 'request body must be a JSON object');
  const item = lookup(kind, id);
  const { username: _u, password: _p, ...fields } = body; // registries: write-only
  Object.assign(item, kind === 'registries' ? fields : body, { id, updatedAt: now() });
  return item;
}

function podAction(pod, action) {
  const valid = POD_ACTIONS[pod.desiredStatus] ?? [];
  if (!['start', 'stop', 'restart', 'terminate'].includes(action)) {
    throw new HttpError(400, `invalid action ${JSON.stringify(action)}`);
  }
  if (cfg.strict && !valid.includes(action)) {
    throw new HttpError(409, `action ${action} is not valid for a pod in status ${pod.desiredStatus}`);
  }
  if (action === 'terminate') {
    state.pods.delete(pod.id);
    return undefined;
  }
  pod.desiredStatus = action === 'stop' ? 'EXITED' : 'RUNNING';
  if (action !== 'stop') pod.lastStartedAt = now();
  pod.actions = POD_ACTIONS[pod.desiredStatus];
  return pod;
}

function billingRecords(query, extra = {}) {
  const n = Math.min(Number(query.lastN) || 1, 24);
  const out = [];
  for (let i = 0; i < n; i++) {
    out.push({ time: new Date(Date.now() - i * 86400000).toISOString(), amount: 1.23, ...extra });
  }
  return out;
}

// ---------------------------------------------------------------- routing

// Each route: [method, pattern, handler(params, ctx) -> {status, body} | body]
const routes = [];
function route(method, pattern, handler) {
  const names = [];
  const re = new RegExp(
    '^' +
      pattern.replace(/[.+?^${}()|[\]\\]/g, '\\$&').replace(/\\\{(\w+)\\\}|:(\w+)/g, (_, a, b) => {
        names.push(a ?? b);
        return '([^/]+)';
      }) +
      '$',
  );
  routes.push({ method, re, names, handler });
}

// ---- REST v2 (4.0.0)
const V2 = [
  // [collection path, state kind, list key, id prefix]
  ['/v2/pods', 'pods', 'pods', 'pod'],
  ['/v2/serverless', 'endpoints', 'endpoints', 'ep'],
  ['/v2/templates', 'templates', 'templates', 'tpl'],
  ['/v2/network-volumes', 'networkVolumes', 'networkVolumes', 'vol'],
  ['/v2/registries', 'registries', 'registries', 'reg'],
  ['/v2/clusters', 'clusters', 'clusters', 'cl'],
];

// delegations must come before /v2/registries/:id
route('GET', '/v2/registries/delegations', () => ({ delegations: [...state.delegations.values()] }));
route('POST', '/v2/registries/delegations', (_p, c) => ({ status: 201, body: create('delegations', c.body, 'del') }));
route('DELETE', '/v2/registries/delegations/:id', (p) => (remove('delegations', p.id), { status: 204 }));

route('GET', '/v2/pods', (_p, c) => {
  let pods = [...state.pods.values()];
  if (c.query.includeClusterPods !== 'true') pods = pods.filter((x) => !x.cluster);
  return { pods };
});
route('POST', '/v2/pods/:id/action', (p, c) => {
  if (!isObject(c.body)) throw new HttpError(400, 'request body must be a JSON object with an action');
  const pod = podAction(lookup('pods', p.id), c.body.action);
  return pod ? pod : { status: 204 };
});
route('GET', '/v2/pods/:id/logs', (p, c) => ({ sse: [`[${p.id}] container started`, `[${p.id}] ready`], query: c.query }));
route('GET', '/v2/serverless/:id/workers', (p) => ({
  workers: [{ id: `${p.id}-w1`, status: 'RUNNING', gpu: { id: GPU_TYPES[0].id, count: 1 } }],
  summary: { RUNNING: 1 },
}));
route('GET', '/v2/serverless/:id/workers/:workerId/logs', (p) => ({ sse: [`[${p.workerId}] worker ready`] }));
route('GET', '/v2/serverless/:id/builds', (p) => ({ builds: [{ id: 'build-1', endpointId: p.id, status: 'COMPLETED' }] }));
route('GET', '/v2/serverless/:id/builds/:buildId', (p) => ({ id: p.buildId, endpointId: p.id, status: 'COMPLETED' }));
route('GET', '/v2/serverless/:id/releases', (p) => ({
  releases: [{ id: 'rel-1', endpointId: p.id, version: 1, diff: {} }],
  rollout: { current: 1, workersOnCurrent: 1, workersTotal: 1 },
}));
route('GET', '/v2/clusters/:id/pods', (p) => {
  lookup('clusters', p.id);
  return { pods: [makePod(`${p.id}-p0`, { cluster: { id: p.id } }), makePod(`${p.id}-p1`, { cluster: { id: p.id } })] };
});

for (const [base, kind, listKey, prefix] of V2) {
  if (kind !== 'pods') route('GET', base, () => ({ [listKey]: [...state[kind].values()] }));
  route('POST', base, (_p, c) => ({ status: 201, body: create(kind, c.body, prefix) }));
  route('GET', `${base}/:id`, (p) => lookup(kind, p.id));
  if (kind !== 'registries') route('PATCH', `${base}/:id`, (p, c) => update(kind, p.id, c.body));
  route('DELETE', `${base}/:id`, (p) => (remove(kind, p.id), { status: 204 }));
}

route('GET', '/v2/catalog/gpus', () => ({ gpus: GPU_TYPES }));
route('GET', '/v2/catalog/gpus/:id', (p) => {
  const g = GPU_TYPES.find((x) => x.id === p.id);
  if (!g) throw new HttpError(404, `gpu type ${p.id} not found`);
  return g;
});
route('GET', '/v2/catalog/cpus', () => ({ cpus: CPU_TYPES }));
route('GET', '/v2/catalog/cpus/:id', (p) => {
  const g = CPU_TYPES.find((x) => x.id === p.id);
  if (!g) throw new HttpError(404, `cpu type ${p.id} not found`);
  return g;
});
route('GET', '/v2/catalog/datacenters', () => ({ dataCenters: DATA_CENTERS }));
route('GET', '/v2/catalog/datacenters/:id', (p) => {
  const d = DATA_CENTERS.find((x) => x.id === p.id);
  if (!d) throw new HttpError(404, `data center ${p.id} not found`);
  return d;
});
route('GET', '/v2/catalog/templates', (_p, c) => ({
  templates: PUBLIC_TEMPLATES.filter((t) => !c.query.source || t.source === c.query.source),
}));

route('GET', '/v2/billing', (_p, c) => ({ records: billingRecords(c.query, { pods: 1.0, serverless: 0.23 }) }));
for (const [sub, key] of [
  ['pods', 'podId'],
  ['clusters', 'clusterId'],
  ['endpoints', 'endpointId'],
  ['network-volumes', 'networkVolumeId'],
  ['serverless', 'serverlessId'],
]) {
  route('GET', `/v2/billing/${sub}`, (_p, c) => ({ records: billingRecords(c.query, c.query[key] ? { [key]: c.query[key] } : {}) }));
}

route('GET', '/v2/account/ssh-keys', () => ({ keys: state.sshKeys }));
route('PUT', '/v2/account/ssh-keys', (_p, c) => {
  if (!isObject(c.body) || !Array.isArray(c.body.keys)) throw new HttpError(400, 'body must be {"keys": [...]}');
  state.sshKeys = c.body.keys.map(String);
  return { keys: state.sshKeys };
});

// ---- REST v1 (1.1.0): bare arrays, start/stop sub-resources
const V1 = [
  ['/v1/pods', 'pods', 'pod'],
  ['/v1/endpoints', 'endpoints', 'ep'],
  ['/v1/templates', 'templates', 'tpl'],
  ['/v1/networkvolumes', 'networkVolumes', 'vol'],
  ['/v1/containerregistryauth', 'registries', 'reg'],
];
for (const [base, kind, prefix] of V1) {
  route('GET', base, () => [...state[kind].values()]);
  route('POST', base, (_p, c) => ({ status: 201, body: create(kind, c.body, prefix) }));
  route('GET', `${base}/:id`, (p) => lookup(kind, p.id));
  route('PATCH', `${base}/:id`, (p, c) => update(kind, p.id, c.body));
  route('DELETE', `${base}/:id`, (p) => (remove(kind, p.id), { status: 204 }));
}
route('POST', '/v1/pods/:id/start', (p) => podAction(lookup('pods', p.id), 'start'));
route('POST', '/v1/pods/:id/stop', (p) => podAction(lookup('pods', p.id), 'stop'));

// ---- serverless job runtime
function newJob(endpointId, input, status) {
  const job = { id: newId('job'), endpointId, status, input, createdAt: now() };
  if (status === 'COMPLETED') job.output = { echo: input ?? null };
  state.jobs.set(job.id, job);
  return job;
}
function getJob(id) {
  const job = state.jobs.get(id);
  if (!job) throw new HttpError(404, `job ${id} not found`);
  return job;
}
const jobView = (j) => ({ id: j.id, status: j.status, ...(j.output !== undefined ? { output: j.output } : {}) });
route('POST', '/runtime/v2/:endpointId/run', (p, c) => {
  const job = newJob(p.endpointId, c.body?.input, 'IN_QUEUE');
  return { id: job.id, status: job.status };
});
route('POST', '/runtime/v2/:endpointId/runsync', (p, c) => jobView(newJob(p.endpointId, c.body?.input, 'COMPLETED')));
route('GET', '/runtime/v2/:endpointId/status/:jobId', (p) => {
  const job = getJob(p.jobId);
  if (job.status === 'IN_QUEUE') {
    job.status = 'COMPLETED';
    job.output = { echo: job.input ?? null };
  }
  return jobView(job);
});
route('POST', '/runtime/v2/:endpointId/status/:jobId', (p) => jobView(getJob(p.jobId)));
route('GET', '/runtime/v2/:endpointId/stream/:jobId', (p) => ({
  status: 'COMPLETED',
  stream: [{ output: getJob(p.jobId).output ?? { echo: null } }],
}));
route('POST', '/runtime/v2/:endpointId/cancel/:jobId', (p) => {
  const job = getJob(p.jobId);
  job.status = 'CANCELLED';
  return jobView(job);
});
route('POST', '/runtime/v2/:endpointId/retry/:jobId', (p) => {
  const job = getJob(p.jobId);
  job.status = 'IN_QUEUE';
  delete job.output;
  return { id: job.id, status: job.status };
});
route('GET', '/runtime/v2/:endpointId/health', () => ({
  jobs: { completed: state.jobs.size, failed: 0, inProgress: 0, inQueue: 0, retried: 0 },
  workers: { idle: 1, running: 0 },
}));
route('POST', '/runtime/v2/:endpointId/purge-queue', (p) => {
  let removed = 0;
  for (const [id, j] of state.jobs) {
    if (j.endpointId === p.endpointId && j.status === 'IN_QUEUE') {
      state.jobs.delete(id);
      removed++;
    }
  }
  return { removed, status: 'completed' };
});

// ---- GraphQL (only what the credential check and a couple of reads need)
route('POST', '/graphql', (_p, c) => {
  const q = isObject(c.body) && typeof c.body.query === 'string' ? c.body.query : '';
  if (/\bmyself\b/.test(q)) {
    return { data: { myself: { id: 'fake-account', email: 'fake@example.invalid', clientBalance: 100 } } };
  }
  return { data: null, errors: [{ message: 'fake-runpod: this GraphQL query is not implemented' }] };
});

// ---------------------------------------------------------------- control routes

function matchFault(method, path) {
  for (const f of faults) {
    if (f.method && f.method.toUpperCase() !== method) continue;
    const ok = f.path.endsWith('*') ? path.startsWith(f.path.slice(0, -1)) : path === f.path;
    if (!ok) continue;
    if (f.times > 0) {
      f.remaining -= 1;
      if (f.remaining <= 0) faults = faults.filter((x) => x !== f);
    }
    return f;
  }
  return null;
}

async function control(req, res, url, rawBody) {
  const p = url.pathname;
  const m = req.method;
  if (p === '/__health' && m === 'GET') return send(res, 200, { ok: true });
  if (p === '/__requests' && m === 'GET') {
    const since = Number(url.searchParams.get('since') ?? -1);
    return send(res, 200, requestLog.filter((r) => r.seq > since));
  }
  if (p === '/__requests' && m === 'DELETE') {
    const n = requestLog.length;
    requestLog = [];
    return send(res, 200, { cleared: n });
  }
  if (p === '/__faults' && m === 'GET') return send(res, 200, faults);
  if (p === '/__faults' && m === 'DELETE') {
    faults = [];
    return send(res, 200, { cleared: true });
  }
  if (p === '/__faults' && m === 'POST') {
    let f;
    try {
      f = JSON.parse(rawBody);
    } catch {
      return send(res, 400, { error: 'fault must be JSON' });
    }
    if (!isObject(f) || typeof f.path !== 'string') return send(res, 400, { error: 'fault needs a "path"' });
    const times = f.times === undefined ? 1 : Number(f.times);
    const fault = {
      method: f.method ?? null,
      path: f.path,
      status: f.status === undefined ? null : Number(f.status),
      body: f.body,
      delay_ms: Math.max(0, Number(f.delay_ms) || 0),
      times,
      remaining: times,
    };
    faults.push(fault);
    return send(res, 201, fault);
  }
  if (p === '/__reset' && m === 'POST') {
    requestLog = [];
    faults = [];
    resetState();
    return send(res, 200, { reset: true });
  }
  return send(res, 404, { error: `no control route ${m} ${p}` });
}

// ---------------------------------------------------------------- SSE answer for log streams

function sendSse(res, lines) {
  res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
  for (const line of lines) res.write(`data: ${JSON.stringify({ time: now(), message: line })}\n\n`);
  res.end();
}

// ---------------------------------------------------------------- server

async function handle(req, res) {
  const url = new URL(req.url, 'http://127.0.0.1');
  const rawBody = await readBody(req);
  if (url.pathname.startsWith('/__')) return control(req, res, url, rawBody);

  let body = null;
  if (rawBody.length > 0) {
    try {
      body = JSON.parse(rawBody);
    } catch {
      body = rawBody;
    }
  }
  const entry = {
    seq: ++seq,
    time: now(),
    method: req.method,
    path: url.pathname,
    query: queryObject(url.searchParams),
    headers: {
      authorization: req.headers.authorization ?? null,
      'content-type': req.headers['content-type'] ?? null,
      'user-agent': req.headers['user-agent'] ?? null,
      accept: req.headers.accept ?? null,
    },
    body,
  };
  requestLog.push(entry);
  process.stderr.write(`fake-runpod: ${req.method} ${url.pathname}${url.search}\n`);

  const fault = matchFault(req.method, url.pathname);
  if (fault?.delay_ms) await new Promise((r) => setTimeout(r, fault.delay_ms));
  if (fault && fault.status !== null) {
    return send(res, fault.status, fault.body ?? { error: `fake-runpod: injected fault ${fault.status}` });
  }

  const auth = req.headers.authorization ?? '';
  const token = /^Bearer\s+(\S+)$/i.exec(auth)?.[1];
  if (!token || (cfg.apiKey && token !== cfg.apiKey)) {
    if (url.pathname === '/graphql') return send(res, 401, { errors: [{ message: 'Unauthorized' }] });
    return send(res, 401, { error: 'Unauthorized: a valid API key is required' });
  }

  for (const r of routes) {
    if (r.method !== req.method) continue;
    const m = r.re.exec(url.pathname);
    if (!m) continue;
    const params = Object.fromEntries(r.names.map((n, i) => [n, decodeURIComponent(m[i + 1])]));
    if (['POST', 'PATCH', 'PUT'].includes(req.method) && typeof body === 'string') {
      throw new HttpError(400, 'request body is not valid JSON');
    }
    const out = r.handler(params, { body, query: entry.query, req });
    if (isObject(out) && Array.isArray(out.sse)) return sendSse(res, out.sse);
    if (isObject(out) && typeof out.status === 'number' && Object.keys(out).every((k) => k === 'status' || k === 'body')) {
      return send(res, out.status, out.body);
    }
    return send(res, 200, out);
  }
  const pathKnown = routes.some((r) => r.re.test(url.pathname));
  if (pathKnown) return send(res, 405, { error: `method ${req.method} not allowed on ${url.pathname}` });
  return send(res, 404, { error: `fake-runpod: no route ${req.method} ${url.pathname}` });
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => {
    const status = err instanceof HttpError ? err.status : 500;
    if (!(err instanceof HttpError)) process.stderr.write(`fake-runpod: ${err?.stack ?? err}\n`);
    send(res, status, { error: err?.message ?? String(err), ...(err?.extra ?? {}) });
  });
});
server.keepAliveTimeout = 1000;

server.on('error', (err) => {
  process.stderr.write(`fake-runpod: ${err.message}\n`);
  process.exit(1);
});

server.listen(cfg.port, cfg.host ?? '127.0.0.1', () => {
  process.stdout.write(`LISTENING ${server.address().port}\n`);
});

function shutdown() {
  server.close(() => process.exit(0));
  server.closeAllConnections?.();
  setTimeout(() => process.exit(0), 500).unref();
}
process.on('SIGINT', shutdown);
process.on('SIGTERM', shutdown);
