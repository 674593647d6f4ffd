// The browser app of `streamdiffusion serve`: webcam / screen img2img or live txt2img over one WebSocket.
import { StreamClient } from './stream_client.js';
import { openSource, FrameGrabber, CaptureError } from './capture.js';

const $ = (id) => document.getElementById(id);
const ui = {
  status: $('status'), model: $('model'), banner: $('banner'), start: $('start'),
  input: $('input'), inputPh: $('input-placeholder'), output: $('output'), outputPh: $('output-placeholder'),
  fps: $('fps'), latency: $('latency'), modelMs: $('model-ms'), frames: $('frames'), dropped: $('dropped'),
  prompt: $('prompt'), negative: $('negative_prompt'), guidance: $('guidance'), delta: $('delta'),
  tIndex: $('t_index_list'), seed: $('seed'), reseed: $('reseed'), filter: $('filter'), threshold: $('threshold'),
  display: $('display'),
  panes: $('panes'), controlPane: $('control-pane'), control: $('control'), controlPh: $('control-placeholder'),
  controlView: $('control-view'), controlViewLabel: $('control-view-label'), cnBox: $('controlnet-box'),
  cnList: $('controlnets'), controlFile: $('control-file'), controlClear: $('control-clear'),
  controlState: $('control-image-state'), ipBox: $('ip-box'), ipFile: $('image-prompt-file'),
  ipClear: $('image-prompt-clear'), ipState: $('image-prompt-state'), ipScale: $('ip-scale'),
  promptList: $('prompt-list'), promptAdd: $('prompt-add'), promptBlend: $('prompt_blend'),
  promptListState: $('prompt-list-state'), seedList: $('seed_list'), seedListState: $('seed-list-state'),
  transition: $('transition'), latentFeedback: $('latent_feedback'), feedbackField: $('feedback-field'),
};

const params = new URLSearchParams(location.search);
const state = {
  mode: ['camera', 'screen', 'txt2img'].includes(params.get('mode')) ? params.get('mode') : 'camera',
  running: false,
  client: null,
  media: null,
  grabber: null,
  errors: [],
  received: 0,
  lastFrameAt: 0,
  recvTimes: [],
  latencyEma: null,
  wake: null,
  generation: 0,
  lastErrorAt: -1e9,
  controlnets: [],          // from the hello: [{name, scale, preprocessor}]
  ipAdapter: null,          // from the hello: {scale} or null
  controlImage: null,       // data URL of the uploaded control image (null = preprocess the input)
  imagePrompt: null,        // data URL of the uploaded image prompt
  controlReceived: 0,
  applied: null,            // the settings of the last "config" reply
  worker: null,             // the worker id of the hello (a fleet's worker serving this stream)
};
const inFlightWindow = Math.min(2, Math.max(1, Number(params.get('window')) || 1));

// The stream id: the routing key of a fleet (nginx hashes /ws on it, so a reconnect finds the same worker while it
// lives). Made here, kept for this tab in sessionStorage, sent as ?stream= and as the sd_stream cookie.
function makeStreamId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_'[b & 63]).join('');
}
const streamId = (() => {
  let id = null;
  try { id = sessionStorage.getItem('sd.stream'); } catch (_) { /* private mode */ }
  if (!id || !/^[A-Za-z0-9_-]{1,64}$/.test(id)) {
    id = makeStreamId();
    try { sessionStorage.setItem('sd.stream', id); } catch (_) { /* private mode */ }
  }
  document.cookie = `sd_stream=${id}; path=/; SameSite=Strict`;
  return id;
})();
// Reconnects: after a {"type":"reconnect"} message (the worker drains) or a connection that dropped while running,
// the page connects again with exponential backoff (250 ms doubling to 8 s, with jitter), keeps its settings and
// goes on; it gives up after kMaxReconnects failures in a row.
const kMaxReconnects = 10;
const reconnect = { attempts: 0, count: 0, timer: null, reason: '' };
// A page left stopped gives its stream slot back after a while: the server has --max-streams of them, and the page's
// answers to its keep-alive pings would hold one for good. Start connects again. ?release_after=S shortens it (tests).
const kReleaseAfterMs = 1000 * (Number(params.get('release_after')) > 0 ? Number(params.get('release_after')) : 60);
let releaseTimer = null;

// Frames smaller than the pane are scaled up by CSS: smooth (default) or pixelated (?display=pixelated), remembered.
function applyDisplay(value) {
  const v = value === 'pixelated' ? 'pixelated' : 'smooth';
  ui.display.value = v;
  ui.output.classList.toggle('pixelated', v === 'pixelated');
  try { localStorage.setItem('sd.display', v); } catch (_) { /* private mode */ }
}
applyDisplay(params.get('display') || (() => { try { return localStorage.getItem('sd.display'); } catch (_) { return null; } })());
ui.display.addEventListener('change', () => applyDisplay(ui.display.value));

function setStatus(text, kind) {
  ui.status.textContent = text;
  ui.status.className = `pill pill-${kind}`;
}

function showBanner(text, kind = 'error') {
  ui.banner.textContent = text;
  ui.banner.className = kind === 'error' ? 'banner' : 'banner info';
  ui.banner.hidden = !text;
}

// ---- settings form -------------------------------------------------------------------------------------------

// Fields the user changed before the first connection keep their value (and are sent); the others show the
// server's defaults.
const touched = new Set();
function fillForm(s) {
  const set = (el, v) => { if (!touched.has(el)) el.value = v; };
  set(ui.prompt, s.prompt ?? '');
  set(ui.negative, s.negative_prompt ?? '');
  set(ui.guidance, s.guidance);
  set(ui.delta, s.delta);
  set(ui.tIndex, (s.t_index_list || []).join(','));
  set(ui.seed, s.seed);
  if (!touched.has(ui.filter)) ui.filter.checked = s.similarity_filter > 0;
  if (s.similarity_filter > 0) set(ui.threshold, s.similarity_filter);
  if (!touched.has(ui.promptList)) setPromptRows(s.prompt_list || []);
  set(ui.seedList, (s.seed_list || []).map(([seed, w]) => `${seed}:${w}`).join(', '));
  set(ui.promptBlend, s.prompt_blend || 'linear');
  // the server says "0", "2.5s" or "30f"; the slider is seconds (a frame count shows as 0 until moved)
  const t = /^([\d.]+)s$/.exec(s.transition || '');
  set(ui.transition, t ? Number(t[1]) : 0);
  set(ui.latentFeedback, s.latent_feedback ?? 0);
  syncOutputs();
}

// ---- prompt list (blend) and seed list --------------------------------------------------------------------------

// One row per prompt: text, weight (0..1, normalised by the server), remove.
function addPromptRow(text = '', weight = 1) {
  const row = document.createElement('div');
  row.className = 'prompt-row';
  const t = document.createElement('input');
  t.type = 'text';
  t.value = text;
  t.placeholder = 'a prompt to blend, (word:1.3) weights allowed';
  const w = document.createElement('input');
  w.type = 'range';
  w.min = '0';
  w.max = '1';
  w.step = '0.05';
  w.value = String(weight);
  w.title = 'weight (the weights are normalised to sum 1)';
  const out = document.createElement('output');
  const del = document.createElement('button');
  del.type = 'button';
  del.textContent = '×';
  del.title = 'remove';
  row.append(t, w, out, del);
  ui.promptList.append(row);
  const changed = () => { touched.add(ui.promptList); scheduleConfig(); };
  t.addEventListener('input', changed);
  w.addEventListener('input', changed);
  del.addEventListener('click', () => { row.remove(); changed(); });
}
function setPromptRows(list) {
  ui.promptList.replaceChildren();
  for (const [text, weight] of list) addPromptRow(text, Math.min(1, weight));
}
// [[text, weight], ...] of the rows with text; [] = no blend (the prompt above). Weights all 0 -> not sent.
function promptListValue() {
  const rows = [...ui.promptList.querySelectorAll('.prompt-row')];
  const list = rows.map((r) => [r.children[0].value, Number(r.children[1].value)]).filter(([t]) => t.trim() !== '');
  return list.length && list.every(([, w]) => w === 0) ? null : list;
}
// "2:1, 7:0.5" -> [[2, 1], [7, 0.5]]; "" -> []; null when malformed (the field turns red, nothing is sent).
function seedListValue() {
  const text = ui.seedList.value.trim();
  if (!text) return [];
  const list = [];
  for (const item of text.split(/[\s,]+/).filter(Boolean)) {
    const m = /^(\d+)(?::([\d.]+))?$/.exec(item);
    if (!m) return null;
    list.push([Number(m[1]), m[2] === undefined ? 1 : Number(m[2])]);
  }
  return list.every(([, w]) => w === 0) || list.length > 16 ? null : list;
}
ui.promptAdd.addEventListener('click', () => {
  // The first row starts from the prompt above, so a blend begins where the picture is.
  if (!ui.promptList.children.length) addPromptRow(ui.prompt.value, 1);
  addPromptRow('', 0.5);
  touched.add(ui.promptList);
  scheduleConfig();
});

function syncOutputs() {
  $('guidance-out').textContent = Number(ui.guidance.value).toFixed(2);
  $('delta-out').textContent = Number(ui.delta.value).toFixed(2);
  $('threshold-out').textContent = Number(ui.threshold.value).toFixed(3);
  state.controlnets.forEach((_, i) => {
    $(`cn-scale-${i}-out`).textContent = Number($(`cn-scale-${i}`).value).toFixed(2);
    const [from, to] = [$(`cn-from-${i}`), $(`cn-to-${i}`)].map((el) => Number(el.value).toFixed(2));
    $(`cn-steps-${i}-out`).textContent = `${from}–${to}`;
  });
  $('ip-scale-out').textContent = Number(ui.ipScale.value).toFixed(2);
  const t = Number(ui.transition.value);
  $('transition-out').textContent = t > 0 ? `${t.toFixed(1)} s` : 'at once';
  $('latent-feedback-out').textContent = Number(ui.latentFeedback.value).toFixed(2);
  const rows = [...ui.promptList.querySelectorAll('.prompt-row')];
  const total = rows.reduce((a, r) => a + (r.children[0].value.trim() ? Number(r.children[1].value) : 0), 0);
  for (const r of rows) r.children[2].textContent = total > 0 && r.children[0].value.trim()
    ? `${Math.round((100 * Number(r.children[1].value)) / total)}%` : '–';
  const pl = promptListValue();
  ui.promptListState.textContent = pl === null ? 'all weights 0' : pl.length ? `${pl.length} prompts blended` : 'off: the prompt above';
  const sl = seedListValue();
  ui.seedList.classList.toggle('invalid', sl === null);
  ui.seedListState.textContent = sl === null ? 'expected seed:weight, ...' : sl.length ? `${sl.length} seeds blended` : 'off: the seed above';
  ui.feedbackField.hidden = state.mode === 'txt2img';
}

function formSettings() {
  const s = {
    prompt: ui.prompt.value,
    negative_prompt: ui.negative.value,
    guidance: Number(ui.guidance.value),
    delta: Number(ui.delta.value),
    seed: Math.max(0, Math.floor(Number(ui.seed.value) || 0)),
  };
  const list = ui.tIndex.value.split(',').map((x) => x.trim()).filter((x) => x !== '');
  if (list.length && list.every((x) => /^\d+$/.test(x))) s.t_index_list = list.map(Number);
  if (state.mode !== 'txt2img') s.similarity_filter = ui.filter.checked ? Number(ui.threshold.value) : 0;
  // Keys in the server's (sorted) order: lastSent compares JSON texts.
  if (state.controlnets.length)
    s.controlnets = state.controlnets.map((cn, i) => ({
      ...('guidance_start' in cn ? {
        guidance_end: Number($(`cn-to-${i}`).value),
        guidance_start: Number($(`cn-from-${i}`).value),
      } : {}),
      preprocessor: $(`cn-pre-${i}`).value,
      scale: Number($(`cn-scale-${i}`).value),
    }));
  if (state.ipAdapter) s.ip_adapter_scale = Number(ui.ipScale.value);
  const pl = promptListValue();
  if (pl !== null) s.prompt_list = pl;
  const sl = seedListValue();
  if (sl !== null) s.seed_list = sl;
  s.transition = Number(ui.transition.value);
  s.prompt_blend = ui.promptBlend.value;
  if (state.mode !== 'txt2img') s.latent_feedback = Number(ui.latentFeedback.value);
  return s;
}

// A plain prompt (seed) replaces the list on the server: send the pair together so neither undoes the other, and
// the transition with them so the change morphs.
const pairs = [['prompt', 'prompt_list'], ['seed', 'seed_list']];

let lastSent = {};
// The server reports a transition as "0", "2.5s" or "30f"; the page sends seconds: compare like with like.
function asSent(settings) {
  const s = { ...settings };
  const t = /^([\d.]+)s?$/.exec(String(s.transition ?? ''));
  if (t) s.transition = Number(t[1]);
  return s;
}
let configTimer = null;
function scheduleConfig() {
  syncOutputs();
  clearTimeout(configTimer);
  configTimer = setTimeout(sendConfig, 150);
}
function sendConfig(extra = {}) {
  if (!state.client?.open) return;
  const s = { ...formSettings(), ...extra };
  const changed = {};
  for (const [k, v] of Object.entries(s)) if (JSON.stringify(lastSent[k]) !== JSON.stringify(v)) changed[k] = v;
  if (!Object.keys(changed).length) return;
  for (const [a, b] of pairs)
    if ((a in changed || b in changed) && a in s && b in s) { changed[a] = s[a]; changed[b] = s[b]; }
  if ('transition' in s && ['prompt', 'prompt_list', 'seed', 'seed_list'].some((k) => k in changed))
    changed.transition = s.transition;
  Object.assign(lastSent, changed);
  state.client.sendConfig(changed);
}

for (const el of [ui.prompt, ui.negative, ui.guidance, ui.delta, ui.tIndex, ui.seed, ui.filter, ui.threshold,
  ui.seedList, ui.transition, ui.latentFeedback, ui.promptBlend])
  el.addEventListener('input', () => { touched.add(el); scheduleConfig(); });
ui.ipScale.addEventListener('input', () => { touched.add(ui.ipScale); scheduleConfig(); });

// ---- ControlNet and IP-Adapter -------------------------------------------------------------------------------

// One row per ControlNet the server loaded: its preprocessor, scale and guidance range (the share of the steps it
// conditions: from < to, a slider pushed past the other one pushes it along). A preprocessor with arguments
// ("canny:100:200") keeps them as its option's value, and the sliders take any value (step "any": a server default
// such as 0.125 is not rounded), so what the server echoes matches the form. Servers from before the range (no guidance_start in the hello) get no range
// keys: they would refuse them.
function setupControlNets(hello) {
  state.controlnets = hello.controlnets || [];
  const names = hello.control_preprocessors || [];
  const on = state.controlnets.length > 0;
  ui.cnBox.hidden = !on;
  ui.controlPane.hidden = !on;
  ui.panes.classList.toggle('three', on);
  ui.cnList.replaceChildren();
  ui.controlView.replaceChildren();
  state.controlnets.forEach((cn, i) => {
    const current = (hello.settings.controlnets || [])[i] || cn;
    const row = document.createElement('div');
    row.className = 'field';
    const title = document.createElement('span');
    title.className = 'cn-name';
    title.textContent = cn.name;
    title.title = cn.name;
    const line = document.createElement('div');
    line.className = 'row';
    const sel = document.createElement('select');
    sel.id = `cn-pre-${i}`;
    sel.title = 'how the control image is made from each input frame (feedback: the previous output)';
    for (const n of names) {
      const o = document.createElement('option');
      o.textContent = n;
      o.value = current.preprocessor === n || current.preprocessor.startsWith(`${n}:`) ? current.preprocessor : n;
      sel.append(o);
    }
    sel.value = current.preprocessor;
    const scale = document.createElement('label');
    scale.className = 'field';
    scale.innerHTML = `<span>Scale <output id="cn-scale-${i}-out"></output></span>`
      + `<input id="cn-scale-${i}" type="range" min="0" max="2" step="any">`;
    line.append(sel, scale);
    const steps = document.createElement('label');
    steps.className = 'field';
    steps.title = 'the share of the denoising steps this ControlNet conditions '
      + '(diffusers\' control_guidance_start / _end)';
    steps.innerHTML = `<span>Steps <output id="cn-steps-${i}-out"></output></span><span class="row">`
      + `<input id="cn-from-${i}" type="range" min="0" max="0.99" step="any" aria-label="from">`
      + `<input id="cn-to-${i}" type="range" min="0.01" max="1" step="any" aria-label="to"></span>`;
    steps.hidden = !('guidance_start' in cn);
    row.append(title, line, steps);
    ui.cnList.append(row);
    const slider = scale.querySelector('input');
    slider.value = current.scale;
    const from = steps.querySelector(`#cn-from-${i}`), to = steps.querySelector(`#cn-to-${i}`);
    from.value = current.guidance_start ?? 0;
    to.value = current.guidance_end ?? 1;
    from.addEventListener('input', () => {
      if (Number(to.value) <= Number(from.value)) to.value = Number(from.value) + 0.01;
    });
    to.addEventListener('input', () => {
      if (Number(from.value) >= Number(to.value)) from.value = Number(to.value) - 0.01;
    });
    for (const el of [sel, slider, from, to]) el.addEventListener('input', scheduleConfig);
    const view = document.createElement('option');
    view.value = i;
    view.textContent = cn.name;
    ui.controlView.append(view);
  });
  ui.controlViewLabel.hidden = state.controlnets.length < 2;
}

function setupIpAdapter(hello) {
  state.ipAdapter = hello.ip_adapter || null;
  ui.ipBox.hidden = !state.ipAdapter;
  if (state.ipAdapter && !touched.has(ui.ipScale)) ui.ipScale.value = state.ipAdapter.scale;
}

// An uploaded picture as a JPEG data URL, at most 1024 px a side (the server fits it anyway; this keeps the message
// small).
async function imageFileToDataUrl(file) {
  const bmp = await createImageBitmap(file);
  const k = Math.min(1, 1024 / Math.max(bmp.width, bmp.height));
  const c = document.createElement('canvas');
  c.width = Math.max(8, Math.round(bmp.width * k));
  c.height = Math.max(8, Math.round(bmp.height * k));
  c.getContext('2d').drawImage(bmp, 0, 0, c.width, c.height);
  bmp.close();
  return c.toDataURL('image/jpeg', 0.9);
}

// Images go out as their own config messages (not through the lastSent comparison).
function sendImages() {
  if (!state.client?.open) return;
  const fields = {};
  if (state.controlnets.length) fields.control_image = state.controlImage;
  if (state.ipAdapter) fields.image_prompt = state.imagePrompt;
  if (Object.keys(fields).length) state.client.sendConfig(fields);
}
function showImageState() {
  ui.controlState.textContent = state.controlImage ? 'uploaded' : (state.mode === 'txt2img' ? 'none' : 'from the input');
  ui.ipState.textContent = state.imagePrompt ? 'uploaded' : 'none';
}
async function onImageFile(input, key) {
  const file = input.files?.[0];
  if (!file) return;
  try {
    state[key] = await imageFileToDataUrl(file);
  } catch (e) {
    showBanner(`Cannot read ${file.name}: ${e.message || e}`);
    return;
  }
  showImageState();
  sendImages();
}
ui.controlFile.addEventListener('change', () => onImageFile(ui.controlFile, 'controlImage'));
ui.ipFile.addEventListener('change', () => onImageFile(ui.ipFile, 'imagePrompt'));
ui.controlClear.addEventListener('click', () => { state.controlImage = null; ui.controlFile.value = ''; showImageState(); sendImages(); });
ui.ipClear.addEventListener('click', () => { state.imagePrompt = null; ui.ipFile.value = ''; showImageState(); sendImages(); });
ui.controlView.addEventListener('change', () => { ui.controlPh.hidden = false; showControlOff(); });

// Why ControlNet i does not run at the applied settings, or '' when it does: as the server's ControlSetting::runs,
// not at scale 0 nor with a range that keeps none of the steps (diffusers' controlnet_keep). The server then makes no
// control image for it, so the pane says so instead of showing the last one.
function controlOff(applied, i) {
  const cn = ((applied || {}).controlnets || [])[Number(i)];
  if (!cn) return '';
  if (cn.scale === 0) return 'Off: scale 0';
  const n = (applied.t_index_list || []).length;
  if (!('guidance_start' in cn) || n === 0) return '';
  for (let k = 0; k < n; k += 1) if (!(k / n < cn.guidance_start || (k + 1) / n > cn.guidance_end)) return '';
  return `Off: steps ${cn.guidance_start}–${cn.guidance_end} keep none of the ${n} denoising steps`;
}

function showControlOff() {
  const off = controlOff(state.applied, ui.controlView.value || '0');
  ui.controlPh.textContent = off || 'The control image appears here';
  if (!off) return;
  ui.control.hidden = true;
  ui.control.removeAttribute('src');
  ui.controlPh.hidden = false;
}

ui.reseed.addEventListener('click', () => {
  ui.seed.value = Math.floor(Math.random() * 1e6);
  touched.add(ui.seed);
  scheduleConfig();
});

// ---- connection ----------------------------------------------------------------------------------------------

async function connect({ again = false } = {}) {
  const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws?stream=${streamId}`;
  const client = new StreamClient(url, { window: inFlightWindow });
  setStatus('connecting…', 'warn');
  try {
    await client.connect();
  } catch (e) {
    if (again) throw e;  // reconnecting: the backoff loop says what happens
    if (e.busy) {
      setStatus('busy', 'bad');
      showBanner(`${e.message}`, 'error');
    } else {
      setStatus('offline', 'bad');
      showBanner(`Cannot reach the server: ${e.message}`);
    }
    throw e;
  }
  const hello = client.hello;
  ui.output.width = hello.width;
  ui.output.height = hello.height;
  // "FOLDER (text ..., autoencoder ..., fp32, cpu)" -> the folder's name and the dtype / device.
  const m = /^(\S+)\s*\((.*)\)$/.exec(hello.model || '');
  const name = m ? m[1].split('/').filter(Boolean).pop() : hello.model;
  const tail = m ? m[2].split(', ').slice(-2).join(' · ') : '';
  // The stream size, and the model's native size (what it was trained for) when the server knows it.
  const native = hello.native_width ? `${hello.native_width}×${hello.native_height}` : '';
  const size = `${hello.width}×${hello.height}`;
  const sizeText = !native ? size : native === size ? `${size} (native)` : `${size} (native ${native})`;
  ui.model.textContent = `${name} · ${sizeText}${tail ? ' · ' + tail : ''}`;
  ui.model.title = hello.model;
  if (!again) {
    setupControlNets(hello);
    setupIpAdapter(hello);
    fillForm(hello.settings);  // a reconnect keeps the form: what the user set goes to the new worker below
  }
  state.worker = hello.worker || null;
  lastSent = asSent(hello.settings);
  if (state.ipAdapter) lastSent.ip_adapter_scale = state.ipAdapter.scale;
  delete lastSent.mode;
  state.applied = hello.settings;
  showControlOff();
  setStatus('connected', 'on');
  client.addEventListener('frame', (ev) => onFrame(ev.detail));
  client.addEventListener('error', (ev) => {
    const msg = ev.detail.message;
    state.errors.push(msg);
    if (/^(frame|generation failed|img2img mode)/.test(msg)) client.forgetOldest();
    state.lastErrorAt = performance.now();
    showBanner(`Server: ${msg}`, 'info');
    wake();
  });
  client.addEventListener('config', (ev) => {
    const applied = ev.detail.settings;
    state.applied = applied;
    lastSent = { ...lastSent, ...asSent(applied) };
    delete lastSent.mode;
    // A mode change brings that mode's default steps: show what the server uses (unless the user is typing there).
    if (document.activeElement !== ui.tIndex) ui.tIndex.value = (applied.t_index_list || []).join(',');
    showControlOff();
  });
  client.addEventListener('control', (ev) => {
    const { index, image } = ev.detail;
    if (String(index) !== (ui.controlView.value || '0')) return;
    state.controlReceived += 1;
    if (controlOff(state.applied, index)) return;  // sent before the change that stopped it
    ui.control.src = image;
    ui.control.hidden = false;
    ui.controlPh.hidden = true;
  });
  client.addEventListener('stats', (ev) => {
    const s = ev.detail;
    ui.modelMs.textContent = s.model_ms ? s.model_ms.toFixed(0) : '–';
    ui.dropped.textContent = (s.dropped_in || 0) + (s.dropped_out || 0);
  });
  client.addEventListener('reconnect', (ev) => {
    // The worker drains: go elsewhere now (the results still in flight are only warm-up frames of the old stream).
    if (state.client !== client) return;
    state.client = null;
    client.close();
    if (state.running) scheduleReconnect(`worker ${ev.detail.worker || ''} draining`, true);
  });
  client.addEventListener('close', (ev) => {
    if (state.client === client) {
      state.client = null;
      const busy = ev.detail.reason === 'busy';
      if (state.running && !busy && ev.detail.code !== 1000) {
        scheduleReconnect(`connection closed (${ev.detail.code})`);
        return;
      }
      setStatus(busy ? 'busy' : 'disconnected', busy ? 'bad' : 'off');
      if (state.running) {
        if (!busy) showBanner(`The connection closed (${ev.detail.code}${ev.detail.reason ? ' ' + ev.detail.reason : ''}).`);
        stop();
      }
    }
  });
  return client;
}

function scheduleReconnect(reason, now = false) {
  clearTimeout(reconnect.timer);
  reconnect.reason = reason;
  const delay = now && reconnect.attempts === 0 ? 0
    : Math.min(8000, 250 * 2 ** reconnect.attempts) * (0.75 + 0.5 * Math.random());
  setStatus('reconnecting…', 'warn');
  reconnect.timer = setTimeout(tryReconnect, delay);
}

async function tryReconnect() {
  if (!state.running || state.client) return;
  const generation = state.generation;
  let client;
  try {
    client = await connect({ again: true });
  } catch (e) {
    if (!state.running || state.generation !== generation) return;
    reconnect.attempts += 1;
    if (reconnect.attempts >= kMaxReconnects) {
      reconnect.attempts = 0;
      showBanner(`Cannot reconnect (${reconnect.reason}): ${e.message}`);
      setStatus('offline', 'bad');
      stop();
      return;
    }
    scheduleReconnect(reconnect.reason);
    return;
  }
  if (!state.running || state.generation !== generation) { client.close(); return; }
  reconnect.attempts = 0;
  reconnect.count += 1;
  state.client = client;
  // The new stream starts from the server's defaults: send the whole form (prompt etc.) and the images again.
  sendConfig({ mode: state.mode === 'txt2img' ? 'txt2img' : 'img2img' });
  if (state.controlImage || state.imagePrompt) sendImages();
  wake();
}

// ---- frames --------------------------------------------------------------------------------------------------

async function onFrame({ blob, latency }) {
  state.received += 1;
  const now = performance.now();
  state.recvTimes.push(now);
  while (state.recvTimes.length && now - state.recvTimes[0] > 2000) state.recvTimes.shift();
  if (latency !== null) state.latencyEma = state.latencyEma === null ? latency : 0.8 * state.latencyEma + 0.2 * latency;
  wake();
  try {
    const bmp = await createImageBitmap(blob);
    ui.output.getContext('2d').drawImage(bmp, 0, 0, ui.output.width, ui.output.height);
    bmp.close();
    ui.outputPh.hidden = true;
    state.lastFrameAt = performance.now();
  } catch (e) {
    state.errors.push(`undecodable result: ${e}`);
  }
  const span = state.recvTimes.length > 1 ? (state.recvTimes.at(-1) - state.recvTimes[0]) / 1000 : 0;
  ui.fps.textContent = span > 0 ? ((state.recvTimes.length - 1) / span).toFixed(1) : '–';
  ui.latency.textContent = state.latencyEma === null ? '–' : state.latencyEma.toFixed(0);
  ui.frames.textContent = state.received;
}

function wake() {
  if (state.wake) { const w = state.wake; state.wake = null; w(); }
}
function nap(ms) {
  return new Promise((resolve) => { state.wake = resolve; setTimeout(() => { if (state.wake === resolve) state.wake = null; resolve(); }, ms); });
}

async function pump(generation) {
  while (state.running && state.generation === generation) {
    const c = state.client;
    if (!c) { await nap(100); continue; }  // between two connections (reconnecting)
    // A result that never came (lost in a reconnect, refused frame) must not block the stream forever.
    if (c.inFlight.length && performance.now() - c.inFlight[0] > 15000) c.forgetOldest();
    if (c.canSend) {
      if (state.mode === 'txt2img') {
        c.requestImage();
      } else if (state.grabber && ui.input.readyState >= 2) {
        const blob = await state.grabber.grab(ui.input);
        if (blob && state.running && state.generation === generation) c.sendFrame(blob);
      }
    }
    // Right after a refused request (e.g. txt2img with a ControlNet but no control image) ask again slowly.
    await nap(c.canSend && performance.now() - state.lastErrorAt > 1000 ? 15 : 1000);
  }
}

// ---- start / stop --------------------------------------------------------------------------------------------

async function start() {
  clearTimeout(releaseTimer);
  showBanner('');
  ui.start.disabled = true;
  const generation = ++state.generation;
  try {
    // The input first: a refused camera takes no stream slot on the server.
    if (state.mode !== 'txt2img') {
      ui.inputPh.textContent = state.mode === 'camera' ? 'Waiting for the camera…' : 'Choose a screen or tab…';
      state.media = await openSource(state.mode);
    }
    if (!state.client) state.client = await connect();
    const hello = state.client.hello;
    if (state.mode !== 'txt2img') {
      ui.input.srcObject = state.media;
      await ui.input.play().catch(() => {});
      ui.inputPh.hidden = true;
      state.grabber = new FrameGrabber(hello.width, hello.height);
      for (const track of state.media.getVideoTracks())
        track.addEventListener('ended', () => { showBanner('The capture ended.', 'info'); stop(); });
    } else {
      ui.inputPh.hidden = false;
      ui.inputPh.textContent = 'Text only: images come from the prompt';
    }
    sendConfig({ mode: state.mode === 'txt2img' ? 'txt2img' : 'img2img' });
    if (state.controlImage || state.imagePrompt) sendImages();
    showImageState();
    state.running = true;
    ui.start.textContent = 'Stop';
    ui.start.classList.add('stop');
    pump(generation);
  } catch (e) {
    if (e instanceof CaptureError) {
      showBanner(e.message);
      ui.inputPh.hidden = false;
      ui.inputPh.textContent = 'No input: ' + e.message;
    }
    state.errors.push(String(e.message || e));
    stopMedia();
  } finally {
    ui.start.disabled = false;
  }
}

function stopMedia() {
  if (state.media) for (const t of state.media.getTracks()) t.stop();
  state.media = null;
  state.grabber = null;
  ui.input.srcObject = null;
}

function releaseStream() {
  if (state.running || !state.client) return;
  const client = state.client;
  state.client = null;  // first: its close event is then not a lost connection
  client.close();
  setStatus('idle', 'off');
}

function stop() {
  state.running = false;
  clearTimeout(reconnect.timer);
  clearTimeout(releaseTimer);
  releaseTimer = setTimeout(releaseStream, kReleaseAfterMs);
  state.generation += 1;
  stopMedia();
  ui.inputPh.hidden = false;
  ui.inputPh.textContent = 'Stopped. Press Start to go on.';
  ui.start.textContent = 'Start';
  ui.start.classList.remove('stop');
  wake();
}

ui.start.addEventListener('click', () => (state.running ? stop() : start()));

for (const b of document.querySelectorAll('button.mode')) {
  b.classList.toggle('active', b.dataset.mode === state.mode);
  b.addEventListener('click', async () => {
    if (b.dataset.mode === state.mode) return;
    const wasRunning = state.running;
    if (wasRunning) stop();
    state.mode = b.dataset.mode;
    for (const o of document.querySelectorAll('button.mode')) o.classList.toggle('active', o === b);
    ui.inputPh.textContent = state.mode === 'txt2img' ? 'Text only: images come from the prompt'
      : `Press Start to use your ${state.mode === 'camera' ? 'camera' : 'screen or a tab'}`;
    if (wasRunning) start();
  });
}

// Test and debugging hook: counters and the last errors.
window.sdApp = {
  start, stop,
  get running() { return state.running; },
  stats: () => ({
    running: state.running,
    mode: state.mode,
    connected: !!state.client?.open,
    sent: state.client?.sent ?? 0,
    received: state.received,
    errors: [...state.errors],
    status: ui.status.textContent,
    banner: ui.banner.hidden ? '' : ui.banner.textContent,
    id: state.client?.hello?.id ?? null,
    stream: streamId,
    streamFromServer: state.client?.hello?.stream ?? null,
    worker: state.worker ?? null,
    reconnects: reconnect.count,
    prompt: ui.prompt.value,
    model: ui.model.textContent,
    outputSize: [ui.output.width, ui.output.height],
    display: ui.display.value,
    controlnets: state.controlnets.length,
    controlReceived: state.controlReceived,
    applied: state.applied,
  }),
};

if (params.get('autostart') === '1') start();
