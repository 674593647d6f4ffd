// Browser end-to-end test of `streamdiffusion serve`: Debian's chromium (headless, fake camera) driven by
// playwright-core against the server on loopback with the tiny fixture model.
//
//   node e2e.mjs --server build/apps/streamdiffusion --fixtures ../shared/fixtures [--web-root web]
//                [--screenshot out.png] [--model-name tiny-sd15] [--size 128x128]
//
// Checks: the page opens; camera frames go out and generated frames come back and are drawn; a prompt change
// changes the output; a refused camera is explained; two pages at once get separate streams (different prompts ->
// different outputs, neither receives more frames than it sent); a page beyond --max-streams shows the busy
// message; SIGINT stops the server cleanly; `serve` with no model arguments streams the built-in model at its native
// 64x64, scaled up on the page (smooth or pixelated), with the native size in the status line (the README screenshot). Exit 0 = passed, 1 = failed, 77 = skipped (no chromium / node_modules / fixture model).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import {
  appStats, check, framesAfter, launchBrowser as launch, parseArgs, requireTools, results, sleep,
  startServer as start, until, writeY4m,
} from './harness.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const args = parseArgs(process.argv.slice(2));
const fixtures = process.env.SD_FIXTURES || args.fixtures || path.join(here, '../../../shared/fixtures');
const model = path.join(fixtures, 'models', args['model-name'] || 'tiny-sd15');
const webRoot = args['web-root'] || path.join(here, '../../web');
const size = args.size || '128x128';
const chromium = await requireTools(args.server, here, [model]);

// The fixture model at --size (the protocol checks), or `serve` with no model arguments at all (the built-in model at
// its native size, as a newcomer starts it).
const startServer = (serveArgs = ['--model', model, '--size', size, '--max-streams', '2',
  '--prompt', 'a watercolour fox in a misty forest']) => start(args.server, webRoot, serveArgs);

// Mean |a - b| over the RGB bytes of two same-sized pixel arrays.
function meanDiff(a, b) {
  let s = 0, n = 0;
  for (let i = 0; i < a.length; i += 4) { s += Math.abs(a[i] - b[i]) + Math.abs(a[i + 1] - b[i + 1]) + Math.abs(a[i + 2] - b[i + 2]); n += 3; }
  return s / n;
}

const outputPixels = (page) => page.evaluate(() => {
  const c = document.getElementById('output');
  return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);
});
// Headless chromium with the still test picture as its fake camera.
const launchBrowser = () => launch(chromium, y4m);
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'sd-e2e-'));
const y4m = path.join(tmp, 'camera.y4m');
writeY4m(y4m, { chroma: true });
let server, browser;
try {
  server = await startServer();
  console.log(`server at ${server.url}`);
  browser = await launchBrowser();
  const context = await browser.newContext({ viewport: { width: 1280, height: 760 }, deviceScaleFactor: 1 });
  const pageErrors = [];
  const a = await context.newPage();
  a.on('pageerror', (e) => pageErrors.push(String(e)));

  // 1. The page opens and connects.
  const res = await a.goto(server.url);
  check(res.ok(), 'page loads', `(HTTP ${res.status()})`);
  check((await a.title()).includes('StreamDiffusion'), 'page title');

  // 2. Camera frames go out, generated frames come back and are drawn.
  await a.click('#start');
  await until(async () => (await appStats(a)).received >= 3, 60000, 'the first generated frames');
  const s1 = await appStats(a);
  check(s1.connected && s1.sent >= 3, 'camera frames sent', JSON.stringify(s1));
  const px = await outputPixels(a);
  let sum = 0, sq = 0;
  for (let i = 0; i < px.length; i += 4) { sum += px[i]; sq += px[i] * px[i]; }
  const n = px.length / 4, mean = sum / n, variance = sq / n - mean * mean;
  check(mean > 0 && variance > 1, 'generated frames are drawn on the output canvas', `(mean ${mean}, var ${variance})`);
  check((await a.textContent('#fps')) !== '–', 'fps shown', await a.textContent('#fps'));

  // 3. A prompt change changes the output (the camera shows a still picture).
  await framesAfter(a, 3);
  const before1 = await outputPixels(a);
  await framesAfter(a, 2);
  const before2 = await outputPixels(a);
  const baseline = meanDiff(before1, before2);
  await a.fill('#prompt', 'neon city skyline at night, synthwave');
  await until(async () => (await a.evaluate(() => window.sdApp.stats().errors.length)) >= 0, 1000, '');
  await sleep(400);  // the settings go out after a short debounce
  await framesAfter(a, 4);
  const after = await outputPixels(a);
  const changed = meanDiff(before2, after);
  console.log(`    mean |diff| same prompt ${baseline.toFixed(2)}, after the prompt change ${changed.toFixed(2)}`);
  check(changed > baseline + 1, 'a prompt change changes the output');

  // 3b. A refused camera gives a clear message (and takes no stream slot).
  const refused = await context.newPage();
  await refused.addInitScript(() => {
    navigator.mediaDevices.getUserMedia = () => Promise.reject(new DOMException('Permission denied', 'NotAllowedError'));
  });
  await refused.goto(server.url);
  await refused.click('#start');
  await until(async () => (await appStats(refused)).banner !== '', 10000, 'the camera-refused banner');
  const sr = await appStats(refused);
  check(/Camera access was refused/.test(sr.banner) && !sr.connected, 'a refused camera is explained', sr.banner);
  await refused.close();

  // 4. Two pages at once: separate streams.
  const b = await context.newPage();
  b.on('pageerror', (e) => pageErrors.push(String(e)));
  await b.goto(server.url);
  await b.fill('#prompt', 'a bowl of green apples, still life');
  await b.click('#start');
  await until(async () => (await appStats(b)).received >= 3, 60000, 'frames on the second page');
  await framesAfter(a, 3);
  await framesAfter(b, 3);
  const sa = await appStats(a), sb = await appStats(b);
  check(sa.id !== sb.id, 'the pages have different stream ids', `${sa.id} ${sb.id}`);
  check(sa.received <= sa.sent && sb.received <= sb.sent, 'neither page receives more frames than it sent',
    JSON.stringify({ a: [sa.sent, sa.received], b: [sb.sent, sb.received] }));
  const oa = await outputPixels(a), ob = await outputPixels(b);
  const ab = meanDiff(oa, ob);
  console.log(`    mean |diff| between the two pages' outputs ${ab.toFixed(2)}`);
  check(ab > 1, 'different prompts on the two pages give different outputs');
  const stats = await (await fetch(`${server.url}api/stats`)).json();
  check(stats.streams === 2 && stats.clients.length === 2, 'the server counts two streams', JSON.stringify(stats.clients));

  // 5. A third page is beyond --max-streams 2: a clear busy message.
  const c = await context.newPage();
  await c.goto(server.url);
  await c.click('#start');
  await until(async () => (await appStats(c)).banner.includes('busy'), 20000, 'the busy banner');
  const sc = await appStats(c);
  check(/busy/.test(sc.banner) && sc.status === 'busy', 'a page beyond --max-streams says the server is busy', sc.banner);
  await c.close();

  // 6. Live txt2img from the prompt box (Text only): frames keep coming, generated from the prompt alone.
  await a.click('button.mode[data-mode="txt2img"]');
  await until(async () => { const s = await appStats(a); return s.running && s.mode === 'txt2img'; }, 10000, 'txt2img mode');
  await framesAfter(a, 3);
  const t2i = await (await fetch(`${server.url}api/stats`)).json();
  check(t2i.clients.some((c) => c.mode === 'txt2img' && c.frames_out > 0), 'Text only streams txt2img frames',
    JSON.stringify(t2i.clients));
  check((await a.inputValue('#t_index_list')) === '0,16,32,45', 'the form shows the txt2img steps',
    await a.inputValue('#t_index_list'));

  // 7. A page left stopped gives its stream slot back (here after 1 s: ?release_after=1); Start connects again.
  await b.close();
  await until(async () => (await (await fetch(`${server.url}api/stats`)).json()).streams === 1, 10000,
    'the closed page\'s stream gone');
  const d = await context.newPage();
  d.on('pageerror', (e) => pageErrors.push(String(e)));
  await d.goto(`${server.url}?mode=txt2img&release_after=1`);
  await d.click('#start');
  await until(async () => (await appStats(d)).received >= 2, 60000, 'frames on the page that will stop');
  await d.click('#start');  // Stop
  await until(async () => (await (await fetch(`${server.url}api/stats`)).json()).streams === 1, 10000,
    'the stopped page\'s stream slot released');
  const released = await (await fetch(`${server.url}api/stats`)).json();
  check(released.streams === 1 && (await appStats(d)).status === 'idle', 'a page left stopped releases its stream slot',
    JSON.stringify({ streams: released.streams, status: (await appStats(d)).status }));
  const before = (await appStats(d)).received;
  await d.click('#start');
  await until(async () => (await appStats(d)).received >= before + 2, 60000, 'frames after Start again');
  check((await appStats(d)).banner === '', 'Start after the release reconnects without an error banner',
    (await appStats(d)).banner);
  await d.close();

  check(pageErrors.length === 0, 'no uncaught errors in the pages', pageErrors.join(' | '));
  await browser.close();
  browser = null;

  // 8. SIGINT: clean shutdown, exit code 0.
  const exited = new Promise((resolve) => server.proc.once('exit', (code, sig) => resolve({ code, sig })));
  server.proc.kill('SIGINT');
  const r = await Promise.race([exited, sleep(15000).then(() => null)]);
  check(r && r.code === 0, 'SIGINT stops the server cleanly', JSON.stringify(r));
  server = null;

  // 9. `serve` with no model arguments: the built-in emoji model at its native 64x64, scaled up on the page.
  server = await startServer([]);
  console.log(`built-in model server at ${server.url}`);
  browser = await launchBrowser();
  const ctx2 = await browser.newContext({ viewport: { width: 1280, height: 760 }, deviceScaleFactor: 1 });
  const e = await ctx2.newPage();
  e.on('pageerror', (err) => pageErrors.push(String(err)));
  await e.goto(server.url);
  await e.click('#start');  // camera -> emoji img2img
  await until(async () => (await appStats(e)).received >= 3, 60000, 'frames from the built-in model');
  const se = await appStats(e);
  check(se.outputSize[0] === 64 && se.outputSize[1] === 64, 'the built-in model streams 64x64 frames',
    JSON.stringify(se.outputSize));
  check(/64×64 \(native\)/.test(se.model), 'the status line says the native size', se.model);
  const box = await e.evaluate(() => document.getElementById('output').getBoundingClientRect().width);
  check(box > 200, 'the 64x64 output is scaled up to the pane', `(${box} px wide)`);
  await e.selectOption('#display', 'pixelated');
  check(await e.evaluate(() => getComputedStyle(document.getElementById('output')).imageRendering) === 'pixelated',
    'the pixelated display choice applies');
  await e.selectOption('#display', 'smooth');
  // Text only with an emoji name: the README screenshot.
  await e.click('button.mode[data-mode="txt2img"]');
  await until(async () => { const s = await appStats(e); return s.running && s.mode === 'txt2img'; }, 10000, 'txt2img mode');
  await e.fill('#prompt', 'red apple');
  await sleep(400);
  await framesAfter(e, 4);
  const ep = await outputPixels(e);
  let red = 0;
  for (let i = 0; i < ep.length; i += 4) if (ep[i] > ep[i + 1] + 40 && ep[i] > ep[i + 2] + 40) red += 1;
  console.log(`    red pixels in the "red apple" frame: ${red} of ${ep.length / 4}`);
  check(red > 64, 'the built-in model draws something red for "red apple"', `(${red} red pixels)`);
  if (args.screenshot) {
    await e.screenshot({ path: args.screenshot });
    console.log(`    screenshot: ${args.screenshot}`);
  }
  check(pageErrors.length === 0, 'no uncaught errors on the built-in model page', pageErrors.join(' | '));
  await browser.close();
  browser = null;
  server.proc.kill('SIGINT');
  server = null;
} catch (e) {
  results.failed += 1;
  console.log(`  FAIL ${e.stack || e}`);
} finally {
  if (browser) await browser.close().catch(() => {});
  if (server) server.proc.kill('SIGKILL');
  fs.rmSync(tmp, { recursive: true, force: true });
}
console.log(`${results.passed} passed, ${results.failed} failed`);
process.exit(results.failed ? 1 : 0);
