// What the browser tests share: arguments, skipping (exit 77), checks, polling, starting `serve` on loopback, the
// page's frame counter and headless chromium with a Y4M file as its fake camera.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

export const SKIP = 77;
export const chromiumPath = process.env.CHROMIUM || '/usr/bin/chromium';

// --name value pairs of the command line.
export const parseArgs = (argv) => Object.fromEntries(
  argv.reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []));

export function skip(why) {
  console.log(`SKIPPED: ${why}`);
  process.exit(SKIP);
}

// Skips unless the server binary, chromium, the given paths and playwright-core are there; returns playwright's
// chromium.
export async function requireTools(server, here, paths = []) {
  if (!server || !fs.existsSync(server)) skip(`no server binary (--server ${server})`);
  if (!fs.existsSync(chromiumPath)) skip(`${chromiumPath} not found (apt-get install chromium; scripts/setup.sh does)`);
  for (const p of paths) if (!fs.existsSync(p)) skip(`no fixture at ${p}`);
  try {
    return (await import('playwright-core')).chromium;
  } catch {
    return skip(`playwright-core is not installed in ${here} (run: cd tests/web && npm ci; scripts/setup.sh does)`);
  }
}

export const results = { passed: 0, failed: 0 };
export function check(cond, what, detail = '') {
  if (cond) {
    results.passed += 1;
    console.log(`  ok   ${what}`);
  } else {
    results.failed += 1;
    console.log(`  FAIL ${what} ${detail}`);
  }
  return cond;
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
export async function until(fn, timeoutMs, what) {
  const t0 = Date.now();
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(100);
  }
}

// `server serve ...serveArgs` on a free loopback port; resolves {proc, url} once it listens.
export function startServer(server, webRoot, serveArgs) {
  return new Promise((resolve, reject) => {
    const proc = spawn(server, ['--log-level', 'warn', 'serve', ...serveArgs, '--port', '0', '--web-root', webRoot,
      '--threads', '1'],
    { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    const timer = setTimeout(() => reject(new Error(`the server did not start: ${out}`)), 60000);
    proc.stdout.on('data', (d) => {
      out += d;
      const m = /listening on (http:\/\/\S+)/.exec(out);
      if (m) { clearTimeout(timer); resolve({ proc, url: m[1] }); }
    });
    proc.stderr.on('data', (d) => process.stderr.write(`[server] ${d}`));
    proc.on('exit', (code) => { clearTimeout(timer); reject(new Error(`the server exited (${code}): ${out}`)); });
  });
}

// A still Y4M picture (4:2:0) for chromium's fake camera: a horizontal grey ramp with a bright square; `chroma`
// adds smooth colour (otherwise grey).
export function writeY4m(file, { w = 160, h = 120, frames = 2, chroma = false } = {}) {
  const Y = Buffer.alloc(w * h), U = Buffer.alloc((w / 2) * (h / 2)), V = Buffer.alloc((w / 2) * (h / 2));
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    const inSquare = x > w / 3 && x < (2 * w) / 3 && y > h / 4 && y < (3 * h) / 4;
    Y[y * w + x] = inSquare ? 235 : 40 + Math.floor((180 * x) / w);
  }
  if (chroma) {
    for (let y = 0; y < h / 2; y++) for (let x = 0; x < w / 2; x++) {
      U[y * (w / 2) + x] = 64 + Math.floor((128 * x) / (w / 2));
      V[y * (w / 2) + x] = 192 - Math.floor((128 * y) / (h / 2));
    }
  } else {
    U.fill(128);
    V.fill(128);
  }
  const parts = [Buffer.from(`YUV4MPEG2 W${w} H${h} F10:1 Ip A1:1 C420jpeg\n`)];
  for (let i = 0; i < frames; i++) parts.push(Buffer.from('FRAME\n'), Y, U, V);
  fs.writeFileSync(file, Buffer.concat(parts));
}

export const appStats = (page) => page.evaluate(() => window.sdApp.stats());
export async function framesAfter(page, n, timeout = 60000) {
  const start = (await appStats(page)).received;
  await until(async () => (await appStats(page)).received >= start + n, timeout, `${n} more frames`);
}

// Headless chromium with `y4m` as its fake camera.
export const launchBrowser = (chromium, y4m) => chromium.launch({
  executablePath: chromiumPath,
  headless: true,
  args: ['--headless', '--no-sandbox', '--use-fake-ui-for-media-stream', '--use-fake-device-for-media-stream',
    `--use-file-for-fake-video-capture=${path.resolve(y4m)}`],
});
