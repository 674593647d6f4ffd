// Browser end-to-end test of the page's reconnect (a fleet's rolling restart, docs/SCALING.md) against
// `streamdiffusion serve` with the built-in emoji model, in Text only mode (no camera needed):
//
//   node e2e_reconnect.mjs --server build/apps/streamdiffusion [--web-root web]
//
// Worker A streams to the page with a prompt the user typed; POST /api/drain makes A send {"type":"reconnect"},
// refuse new streams (503) and exit once the page has gone. Worker B then starts on the same port (what a restarted
// worker, or nginx's next upstream, looks like to the page). Checks: the page reconnects by itself with its stream id
// (?stream=, sessionStorage), gets frames from B, keeps its prompt in the form and sends it to B (B's config reply),
// and shows no error banner. Then B is killed (SIGKILL: the socket just drops) and C starts on the port: the page
// finds it by its backoff, again with its prompt.
// Exit 0 = passed, 1 = failed, 77 = skipped (no chromium / node_modules).
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import { appStats, check, framesAfter, launchBrowser, parseArgs, requireTools, results, until, writeY4m } from './harness.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const args = parseArgs(process.argv.slice(2));
const webRoot = args['web-root'] || path.join(here, '../../web');
const chromium = await requireTools(args.server, here, []);

// `serve` with this worker id on `port` (0 = a free one); resolves {proc, url, port, exited} once it listens.
function startWorker(workerId, port) {
  return new Promise((resolve, reject) => {
    const proc = spawn(args.server, ['--log-level', 'info', 'serve', '--prompt', 'red apple', '--port', String(port),
      '--web-root', webRoot, '--threads', '1', '--worker-id', workerId, '--drain-seconds', '10'],
    { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '', err = '';
    const exited = new Promise((r) => proc.on('exit', (code) => r(code)));
    const timer = setTimeout(() => reject(new Error(`${workerId} did not start: ${out}`)), 60000);
    proc.stdout.on('data', (d) => {
      out += d;
      const m = /listening on (http:\/\/127\.0\.0\.1:(\d+)\/)/.exec(out);
      if (m) { clearTimeout(timer); resolve({ proc, url: m[1], port: Number(m[2]), exited, log: () => err }); }
    });
    proc.stderr.on('data', (d) => { err += d; });
    proc.on('exit', (code) => { clearTimeout(timer); reject(new Error(`${workerId} exited (${code}): ${out}${err}`)); });
  });
}

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'sd-e2e-reconnect-'));
const y4m = path.join(tmp, 'camera.y4m');
writeY4m(y4m, {});
const prompt = 'a blue bird that survives a drain';
let a, b, c, browser;
try {
  a = await startWorker('worker-A', 0);
  console.log(`worker A at ${a.url}`);
  browser = await launchBrowser(chromium, y4m);
  const p = await (await browser.newContext({ viewport: { width: 1280, height: 900 } })).newPage();
  const pageErrors = [];
  p.on('pageerror', (e) => pageErrors.push(String(e)));
  await p.goto(`${a.url}?mode=txt2img`);
  await p.fill('#prompt', prompt);  // typed before Start: the page sends it with the first config
  await p.click('#start');
  await until(async () => (await appStats(p)).applied?.prompt === prompt && (await appStats(p)).received >= 3, 60000,
    'frames of the typed prompt from A');
  const s1 = await appStats(p);
  check(s1.worker === 'worker-A', 'the hello names worker A', s1.worker);
  check(/^[A-Za-z0-9_-]{16}$/.test(s1.stream), 'the page made a stream id', s1.stream);
  check(s1.streamFromServer === s1.stream, 'the server got the stream id (?stream=)', `${s1.streamFromServer}`);
  const stored = await p.evaluate(() => sessionStorage.getItem('sd.stream'));
  check(stored === s1.stream, 'the stream id is kept in sessionStorage', stored);

  // Drain A (loopback POST): reconnect message, 503 for new streams, A exits once the page has gone.
  const drain = await fetch(`${a.url}api/drain`, { method: 'POST' });
  check(drain.status === 202, 'POST /api/drain on loopback is accepted', String(drain.status));
  const code = await Promise.race([a.exited, new Promise((r) => setTimeout(() => r('timeout'), 12000))]);
  check(code === 0, 'worker A exits cleanly after its drain', String(code));
  check(/POST \/api\/drain: draining/.test(a.log()) && /drain done in [\d.]+ s, 0 stream\(s\) still open/.test(a.log()),
    'A drained with no stream left over', a.log().split('\n').filter((l) => /drain/.test(l)).join(' | '));

  // B on the same port: the page's backoff finds it.
  b = await startWorker('worker-B', a.port);
  console.log(`worker B at ${b.url}`);
  await until(async () => (await appStats(p)).worker === 'worker-B', 30000, 'the page on worker B');
  await until(async () => (await appStats(p)).applied?.prompt === prompt, 20000, 'the prompt applied by B');
  await framesAfter(p, 3, 30000);
  const s2 = await appStats(p);
  check(s2.reconnects >= 1, 'the page reconnected by itself', String(s2.reconnects));
  check(s2.prompt === prompt, 'the form keeps the prompt', s2.prompt);
  check(s2.applied?.prompt === prompt, 'worker B applies the kept prompt', s2.applied?.prompt);
  check(s2.stream === s1.stream && s2.streamFromServer === s1.stream, 'the same stream id on B', s2.streamFromServer);
  check(s2.running && s2.connected, 'the page is running and connected', JSON.stringify({ running: s2.running, connected: s2.connected }));
  check(s2.banner === '', 'no banner shown (no error)', s2.banner);
  check(s2.errors.length === 0, 'no error messages', JSON.stringify(s2.errors));

  // A worker that dies (SIGKILL: no reconnect message, the socket just drops): the page retries with backoff and
  // finds worker C on the same port.
  b.proc.kill('SIGKILL');
  await b.exited;
  const reconnectsBefore = (await appStats(p)).reconnects;
  c = await startWorker('worker-C', a.port);
  await until(async () => (await appStats(p)).worker === 'worker-C', 30000, 'the page on worker C');
  await until(async () => (await appStats(p)).applied?.prompt === prompt, 20000, 'the prompt applied by C');
  await framesAfter(p, 3, 30000);
  const s3 = await appStats(p);
  check(s3.reconnects === reconnectsBefore + 1, 'after a dropped connection too', `${reconnectsBefore} -> ${s3.reconnects}`);
  check(s3.applied?.prompt === prompt && s3.prompt === prompt, 'worker C applies the kept prompt', s3.applied?.prompt);
  check(s3.errors.length === 0 && s3.banner === '', 'still no error shown', JSON.stringify([s3.errors, s3.banner]));
  check(pageErrors.length === 0, 'no page errors', pageErrors.join('; '));
} catch (e) {
  results.failed += 1;
  console.log(`  FAIL ${e.stack || e}`);
} finally {
  if (browser) await browser.close();
  for (const w of [a, b, c]) if (w) w.proc.kill('SIGINT');
  fs.rmSync(tmp, { recursive: true, force: true });
}
console.log(`${results.passed} passed, ${results.failed} failed`);
process.exit(results.failed ? 1 : 0);
