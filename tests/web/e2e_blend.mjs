// Browser end-to-end test of the page's "Blend & morph" controls (prompt list with weights, blend method, seed
// list, transition slider, latent feedback) against `streamdiffusion serve` with the built-in emoji model, in Text
// only mode (no camera needed).
//
//   node e2e_blend.mjs --server build/apps/streamdiffusion [--web-root web]
//
// Checks: Add prompt starts a list from the prompt box and the server applies the list (its config reply) with the
// transition; the output changes; the weights show as normalised percentages; a bad seed list turns red and is not
// sent, a good one is applied; the latent-feedback slider is hidden in Text only; removing the rows turns the list off.
// Exit 0 = passed, 1 = failed, 77 = skipped (no chromium / node_modules).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import {
  appStats, check, framesAfter, launchBrowser, parseArgs, requireTools, results, sleep, startServer as start, until,
  writeY4m,
} from './harness.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const args = parseArgs(process.argv.slice(2));
const webRoot = args['web-root'] || path.join(here, '../../web');
const chromium = await requireTools(args.server, here, []);

const outputPixels = (page) => page.evaluate(() => {
  const c = document.getElementById('output');
  return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);
});
function meanDiff(a, b) {
  let s = 0, n = 0;
  for (let i = 0; i < a.length; i += 4) { s += Math.abs(a[i] - b[i]) + Math.abs(a[i + 1] - b[i + 1]) + Math.abs(a[i + 2] - b[i + 2]); n += 3; }
  return s / n;
}
// Range inputs cannot be filled: set the value and fire the input event the page listens to.
const setRange = (page, selector, value) => page.evaluate(([sel, v]) => {
  const el = document.querySelector(sel);
  el.value = String(v);
  el.dispatchEvent(new Event('input', { bubbles: true }));
}, [selector, value]);
const applied = async (page) => (await appStats(page)).applied || {};

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'sd-e2e-blend-'));
const y4m = path.join(tmp, 'camera.y4m');
writeY4m(y4m, {});
let server, browser;
try {
  server = await start(args.server, webRoot, ['--prompt', 'red apple']);  // the built-in model, 64x64
  console.log(`server at ${server.url}`);
  browser = await launchBrowser(chromium, y4m);
  const p = await (await browser.newContext({ viewport: { width: 1280, height: 900 } })).newPage();
  const pageErrors = [];
  p.on('pageerror', (e) => pageErrors.push(String(e)));
  await p.goto(`${server.url}?mode=txt2img`);
  await p.click('#start');
  await until(async () => (await appStats(p)).received >= 3, 60000, 'the first txt2img frames');
  check(await p.isVisible('#blend-box'), 'the Blend & morph box is shown');
  check(!(await p.isVisible('#latent_feedback')), 'latent feedback is hidden in Text only (no input frames)');
  const before = await outputPixels(p);

  // A prompt list: the first row starts from the prompt box, the second is new.
  await setRange(p, '#transition', 0.5);
  await p.click('#prompt-add');
  const rows = p.locator('.prompt-row');
  check((await rows.count()) === 2, 'Add prompt makes two rows', `(${await rows.count()})`);
  check((await rows.nth(0).locator('input[type=text]').inputValue()) === 'red apple', 'the first row is the prompt box');
  await rows.nth(1).locator('input[type=text]').fill('rocket');
  await setRange(p, '.prompt-row:nth-child(2) input[type=range]', 1);
  await until(async () => (await applied(p)).prompt_list?.length === 2, 20000, 'the prompt list applied');
  const a1 = await applied(p);
  check(JSON.stringify(a1.prompt_list) === JSON.stringify([['red apple', 1], ['rocket', 1]]),
    'the server applies the list with its weights', JSON.stringify(a1.prompt_list));
  check(a1.transition === '0.5s', 'the transition goes with it', a1.transition);
  check((await rows.nth(0).locator('output').textContent()) === '50%', 'weights show normalised',
    await rows.nth(0).locator('output').textContent());
  await sleep(700);  // past the 0.5 s morph
  await framesAfter(p, 4);
  const blended = await outputPixels(p);
  const d = meanDiff(before, blended);
  console.log(`    mean |diff| before / after blending in "rocket": ${d.toFixed(2)}`);
  check(d > 1, 'the blend changes the output', `(${d})`);

  // Blend method and seed list.
  await p.selectOption('#prompt_blend', 'slerp');
  await until(async () => (await applied(p)).prompt_blend === 'slerp', 20000, 'slerp applied');
  check(true, 'the blend method is applied');
  await p.fill('#seed_list', '3:1, x');
  await sleep(400);
  check(await p.evaluate(() => document.getElementById('seed_list').classList.contains('invalid')),
    'a malformed seed list is marked');
  check(((await applied(p)).seed_list || []).length === 0, 'and not sent');
  await p.fill('#seed_list', '3:1, 4:0.5');
  await until(async () => ((await applied(p)).seed_list || []).length === 2, 20000, 'the seed list applied');
  check(JSON.stringify((await applied(p)).seed_list) === JSON.stringify([[3, 1], [4, 0.5]]), 'the seed list is applied');

  // Removing the rows turns the list off: back to the prompt box.
  await rows.nth(1).locator('button').click();
  await rows.nth(0).locator('button').click();
  await until(async () => (await applied(p)).prompt_list?.length === 0, 20000, 'the list off');
  check((await applied(p)).prompt === 'red apple', 'without rows the prompt box rules again');
  await framesAfter(p, 2);
  const st = await (await fetch(`${server.url}api/stats`)).json();
  check(st.clients.every((c) => c.errors === 0), 'no stream errors on the server', JSON.stringify(st.clients));
  check(pageErrors.length === 0, 'no uncaught errors in the page', pageErrors.join(' | '));
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
