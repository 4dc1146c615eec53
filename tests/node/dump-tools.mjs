#!/usr/bin/env node
// dump-tools.mjs — regenerate tests/fixtures/runpod-<version>-tools.json from the pinned
// @runpod/mcp-server packages (npm aliases runpod-mcp-1 = 1.1.0, runpod-mcp-4 = 4.0.0).
//
//   node dump-tools.mjs            # writes both fixture files
//   node dump-tools.mjs --check    # exits 1 if a fixture file differs from the live tools/list
//
// Each server is started over stdio with a dummy RUNPOD_API_KEY; only initialize and
// tools/list are sent, so no RunPod API request is made. The file holds
// {"package","version","count","tools":[{name,description,inputSchema}]} in server order.

import { readFile, writeFile, mkdir } from 'node:fs/promises';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const fixtures = path.resolve(here, '..', 'fixtures');
const require = createRequire(import.meta.url);

const SERVERS = [
  { alias: 'runpod-mcp-1', bin: 'dist/index.mjs' },
  { alias: 'runpod-mcp-4', bin: 'dist/stdio.mjs' },
];

async function listTools(entry) {
  const transport = new StdioClientTransport({
    command: process.execPath,
    args: [entry],
    env: {
      PATH: process.env.PATH ?? '',
      HOME: process.env.HOME ?? '',
      RUNPOD_API_KEY: 'dump-tools-dummy-key',
      // keep any accidental request on loopback (nothing listens there)
      RUNPOD_API_BASE_URL: 'http://127.0.0.1:9',
    },
    stderr: 'ignore',
  });
  const client = new Client({ name: 'toolgate-dump-tools', version: '1.0.0' }, { capabilities: {} });
  await client.connect(transport, { timeout: 30000 });
  try {
    const tools = [];
    let cursor;
    do {
      const page = await client.listTools(cursor ? { cursor } : {}, { timeout: 30000 });
      tools.push(...page.tools);
      cursor = page.nextCursor;
    } while (cursor);
    return tools.map(({ name, description, inputSchema }) => ({ name, description, inputSchema }));
  } finally {
    await client.close().catch(() => {});
  }
}

async function main() {
  const check = process.argv.includes('--check');
  let stale = false;
  await mkdir(fixtures, { recursive: true });
  for (const { alias, bin } of SERVERS) {
    const pkgPath = require.resolve(`${alias}/package.json`);
    const pkg = JSON.parse(await readFile(pkgPath, 'utf8'));
    const tools = await listTools(path.join(path.dirname(pkgPath), bin));
    const doc = { package: pkg.name, version: pkg.version, count: tools.length, tools };
    const text = JSON.stringify(doc, null, 2) + '\n';
    const out = path.join(fixtures, `runpod-${pkg.version}-tools.json`);
    if (check) {
      const old = await readFile(out, 'utf8').catch(() => '');
      if (old !== text) {
        process.stderr.write(`stale: ${out}\n`);
        stale = true;
      }
    } else {
      await writeFile(out, text);
      process.stdout.write(`${out}: ${tools.length} tools\n`);
    }
  }
  process.exit(stale ? 1 : 0);
}

main().catch((e) => {
  process.stderr.write(`dump-tools: ${e?.stack ?? e}\n`);
  process.exit(1);
});
