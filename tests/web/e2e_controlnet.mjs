// Browser end-to-end test of the ControlNet and IP-Adapter controls of `streamdiffusion serve`'s page: Debian's
// chromium (headless, fake camera) driven by playwright-core against the server on loopback with the tiny fixture
// model, the tiny ControlNet (preprocessor gray at start) and the tiny IP-Adapter.
//
//   node e2e_controlnet.mjs --server build/apps/streamdiffusion --fixtures ../shared/fixtures [--web-root web]
//                           [--screenshot out.png]
//
// Checks: the page shows the control pane and one ControlNet row; frames flow; the control image shown is the gray
// picture at first and a canny edge map (nearly all black / white, some white) once canny is chosen; the scale slider
// reaches the server (the config reply) and frames keep flowing at scale 0 and 1.5; at scale 0, and with a range that
// keeps no step, the control pane says the net is off instead of showing the last image; the guidance range sliders
// reach the server and keep start < end; an uploaded control image replaces the preprocessing (the control pane shows it)
// and Clear goes back; with an IP-Adapter an image prompt upload and the scale slider are applied. Exit 0 = passed,
// 1 = failed, 77 = skipped (no chromium / node_modules / fixtures).
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
const fixtures = process.env.SD_FIXTURES || args.fixtures || path.join(here, '../../../shared/fixtures');
const model = path.join(fixtures, 'models', 'tiny-sd15');
const controlnet = path.join(fixtures, 'controlnet', 'models', 'tiny-controlnet-sd15');
const ipAdapter = path.join(fixtures, 'ipadapter', 'models', 'tiny-ip-adapter-sd15');
const webRoot = args['web-root'] || path.join(here, '../../web');
const chromium = await requireTools(args.server, here, [model, controlnet, ipAdapter]);
const startServer = (serveArgs) => start(args.server, webRoot, serveArgs);

// The fake camera (writeY4m, grey): a horizontal grey ramp (no edges) with a bright square (four edges).
async function controlsAfter(page, n, timeout = 60000) {
  const start = (await appStats(page)).controlReceived;
  await until(async () => (await appStats(page)).controlReceived >= start + n, timeout, `${n} more control images`);
}
// The control image shown: share of (nearly) black or white pixels, share of white ones, mean level.
const controlLevels = (page) => page.evaluate(async () => {
  const img = document.getElementById('control');
  await img.decode().catch(() => {});
  const c = document.createElement('canvas');
  c.width = img.naturalWidth;
  c.height = img.naturalHeight;
  const g = c.getContext('2d');
  g.drawImage(img, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let bw = 0, white = 0, sum = 0;
  const n = d.length / 4;
  for (let i = 0; i < d.length; i += 4) {
    const m = (d[i] + d[i + 1] + d[i + 2]) / 3;
    if (m < 40 || m > 215) bw += 1;
    if (m > 215) white += 1;
    sum += m;
  }
  return { bw: bw / n, white: white / n, mean: sum / n, width: c.width, visible: img.offsetWidth > 0 };
});
// Uploads a picture drawn in the page (a flat colour, `rgb`) through a file input, as a user's PNG would be.
async function uploadPicture(page, selector, rgb) {
  const png = await page.evaluate(async (colour) => {
    const c = document.createElement('canvas');
    c.width = 96;
    c.height = 80;
    const g = c.getContext('2d');
    g.fillStyle = `rgb(${colour.join(',')})`;
    g.fillRect(0, 0, c.width, c.height);
    const blob = await new Promise((r) => c.toBlob(r, 'image/png'));
    return Array.from(new Uint8Array(await blob.arrayBuffer()));
  }, rgb);
  await page.setInputFiles(selector, { name: 'picture.png', mimeType: 'image/png', buffer: Buffer.from(png) });
}

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'sd-e2e-cn-'));
const y4m = path.join(tmp, 'camera.y4m');
writeY4m(y4m);
let server, browser;
try {
  server = await startServer(['--model', model, '--size', '128x128', '--controlnet', controlnet,
    '--control-preprocessor', 'gray', '--ip-adapter', ipAdapter, '--prompt', 'a watercolour fox']);
  console.log(`server at ${server.url}`);
  browser = await launchBrowser(chromium, y4m);
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, deviceScaleFactor: 1 });
  const pageErrors = [];
  const p = await context.newPage();
  p.on('pageerror', (e) => pageErrors.push(String(e)));
  await p.goto(server.url);
  await p.click('#start');
  await until(async () => (await appStats(p)).received >= 3, 60000, 'the first generated frames');
  const s0 = await appStats(p);
  check(s0.controlnets === 1, 'the page knows the server has one ControlNet', JSON.stringify(s0.controlnets));
  check(await p.isVisible('#control-pane') && await p.isVisible('#controlnet-box'), 'the control pane and the ControlNet controls show');
  check(await p.isVisible('#ip-box'), 'the IP-Adapter controls show');
  check(await p.inputValue('#cn-pre-0') === 'gray', 'the preprocessor select shows the server default', await p.inputValue('#cn-pre-0'));

  // The gray control image: grey levels, not an edge map.
  await controlsAfter(p, 2);
  const gray = await controlLevels(p);
  console.log(`    gray control image: ${JSON.stringify(gray)}`);
  check(gray.visible && gray.width === 128, 'the control image is shown at the stream size', JSON.stringify(gray));
  check(gray.bw < 0.6, 'the gray control image is not black and white', JSON.stringify(gray));

  // canny: the control image becomes an edge map of the camera picture.
  const cannyValue = await p.evaluate(() => [...document.querySelectorAll('#cn-pre-0 option')].find((o) => o.textContent === 'canny').value);
  await p.selectOption('#cn-pre-0', cannyValue);
  await until(async () => (await appStats(p)).applied?.controlnets?.[0]?.preprocessor?.startsWith('canny'), 20000,
    'the server applying canny');
  await controlsAfter(p, 3);
  const canny = await controlLevels(p);
  console.log(`    canny control image: ${JSON.stringify(canny)}`);
  check(canny.bw > 0.9, 'the canny control image is black and white', JSON.stringify(canny));
  check(canny.white > 0.005 && canny.white < 0.4, 'the canny control image has edges (some white)', JSON.stringify(canny));
  await framesAfter(p, 3);

  // The scale slider reaches the server; frames keep flowing at 0 and 1.5.
  for (const v of ['0', '1.5']) {
    await p.$eval('#cn-scale-0', (el, x) => { el.value = x; el.dispatchEvent(new Event('input', { bubbles: true })); }, v);
    await until(async () => (await appStats(p)).applied?.controlnets?.[0]?.scale === Number(v), 20000, `scale ${v} applied`);
    await framesAfter(p, 3);
    check(true, `frames flow at ControlNet scale ${v}`);
    if (v === '0') {
      // The server makes no control image for a net that does not run: the pane says why, not the last image.
      await framesAfter(p, 2);
      check(await p.isVisible('#control-placeholder') && !(await p.isVisible('#control')), 'at scale 0 the control pane shows no image');
      check(await p.textContent('#control-placeholder') === 'Off: scale 0', 'the control pane says the net is off',
        await p.textContent('#control-placeholder'));
    }
  }
  await controlsAfter(p, 2);
  check(await p.isVisible('#control') && !(await p.isVisible('#control-placeholder')), 'back on, the control image shows again');
  check(await p.textContent('#cn-scale-0-out') === '1.50', 'the scale is shown beside the slider', await p.textContent('#cn-scale-0-out'));

  // The guidance range: each slider reaches the server, and one moved past the other pushes it along (the server
  // refuses start >= end).
  const setRange = (sel, x) => p.$eval(sel, (el, v) => { el.value = v; el.dispatchEvent(new Event('input', { bubbles: true })); }, x);
  const applied = async () => (await appStats(p)).applied?.controlnets?.[0] || {};
  check((await applied()).guidance_start === 0 && (await applied()).guidance_end === 1, 'the range starts at the server default 0..1',
    JSON.stringify(await applied()));
  await setRange('#cn-from-0', '0.6');
  await until(async () => (await applied()).guidance_start === 0.6, 20000, 'guidance_start 0.6 applied');
  check((await applied()).guidance_end === 1, 'the end stays', JSON.stringify(await applied()));
  await framesAfter(p, 3);
  // 0.6..1 keeps neither step of the default two (step 0 is 0..0.5, step 1 0.5..1).
  check((await appStats(p)).applied?.t_index_list?.length === 2, 'two denoising steps', JSON.stringify((await appStats(p)).applied));
  check(await p.textContent('#control-placeholder') === 'Off: steps 0.6–1 keep none of the 2 denoising steps',
    'a range that keeps no step turns the control pane off', await p.textContent('#control-placeholder'));
  await setRange('#cn-to-0', '0.5');
  await until(async () => (await applied()).guidance_end === 0.5, 20000, 'guidance_end 0.5 applied');
  check((await applied()).guidance_start === 0.49, 'the start slider was pushed below the end', JSON.stringify(await applied()));
  check(await p.textContent('#cn-steps-0-out') === '0.49–0.50', 'the range is shown beside the sliders', await p.textContent('#cn-steps-0-out'));
  await framesAfter(p, 3);
  await setRange('#cn-from-0', '0');
  await setRange('#cn-to-0', '1');
  await until(async () => (await applied()).guidance_start === 0 && (await applied()).guidance_end === 1, 20000, 'the full range again');

  // An uploaded control image replaces the preprocessing: the control pane shows the flat picture (not edges).
  await uploadPicture(p, '#control-file', [200, 200, 200]);
  await until(async () => (await appStats(p)).applied?.has_control_image === true, 20000, 'the control image applied');
  await controlsAfter(p, 2);
  const up = await controlLevels(p);
  console.log(`    uploaded control image: ${JSON.stringify(up)}`);
  check(Math.abs(up.mean - 200) < 8, 'the uploaded control image is the one used', JSON.stringify(up));
  await framesAfter(p, 2);
  await p.click('#control-clear');
  await until(async () => (await appStats(p)).applied?.has_control_image === false, 20000, 'the control image cleared');
  await controlsAfter(p, 2);
  const back = await controlLevels(p);
  check(back.bw > 0.9, 'after Clear the control image is the canny edge map again', JSON.stringify(back));
  if (args.screenshot) {
    await p.screenshot({ path: args.screenshot });
    console.log(`    screenshot: ${args.screenshot}`);
  }

  // IP-Adapter: an image prompt upload and the (server-wide) scale slider.
  await uploadPicture(p, '#image-prompt-file', [220, 40, 40]);
  await until(async () => (await appStats(p)).applied?.has_image_prompt === true, 20000, 'the image prompt applied');
  check(await p.textContent('#image-prompt-state') === 'uploaded', 'the page says an image prompt is set');
  await p.$eval('#ip-scale', (el) => { el.value = '0.5'; el.dispatchEvent(new Event('input', { bubbles: true })); });
  await until(async () => (await appStats(p)).applied?.ip_adapter_scale === 0.5, 20000, 'ip_adapter_scale 0.5 applied');
  await framesAfter(p, 3);
  check(true, 'frames flow with an image prompt at ip_adapter_scale 0.5');

  // The server's counters.
  const st = await (await fetch(`${server.url}api/stats`)).json();
  const client = st.clients.find((c) => c.id === s0.id) || {};
  check(client.controlnet_calls > 5 && client.errors === 0, 'the server counts ControlNet calls and no errors', JSON.stringify(client));

  // Text only: canny has no frames, an uploaded control image makes it work.
  await p.click('button.mode[data-mode="txt2img"]');
  await until(async () => (await appStats(p)).banner.includes('control_image'), 20000, 'the txt2img ControlNet hint');
  check(true, 'txt2img with canny and no control image explains itself');
  await uploadPicture(p, '#control-file', [90, 90, 90]);
  await framesAfter(p, 3);
  check((await appStats(p)).mode === 'txt2img', 'txt2img frames flow with an uploaded control image');

  check(pageErrors.length === 0, 'no uncaught errors in the page', pageErrors.join(' | '));
  await browser.close();
  browser = null;
  const exited = new Promise((resolve) => server.proc.once('exit', (code, sig) => resolve({ code, sig })));
  server.proc.kill('SIGINT');
  const r = await Promise.race([exited, sleep(15000).then(() => null)]);
  check(r && r.code === 0, 'SIGINT stops the server cleanly', JSON.stringify(r));
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
