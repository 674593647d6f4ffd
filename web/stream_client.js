// One WebSocket stream to `streamdiffusion serve`: JPEG frames out, JPEG results in, JSON control both ways.
// The client keeps at most `window` frames in flight: a new frame goes out only when an earlier result came back,
// so a slow server never builds up a queue.
// A `{"type":"reconnect"}` message (the server drains) is dispatched as a 'reconnect' event like any other message
// type; the page opens a new StreamClient (see app.js: reconnect with backoff, same stream id, same settings).

export class StreamClient extends EventTarget {
  constructor(url, { window = 1 } = {}) {
    super();
    this.url = url;
    this.window = window;
    this.inFlight = [];   // send times (ms) of frames without a result yet, oldest first
    this.sent = 0;
    this.received = 0;
    this.dropped = 0;     // requests the server answered with "dropped" instead of a frame
    this.hello = null;
    this.ws = null;
    this.closedReason = null;
  }

  connect() {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this.url);
      ws.binaryType = 'blob';
      this.ws = ws;
      let settled = false;
      ws.onmessage = (ev) => {
        if (typeof ev.data === 'string') {
          let msg;
          try { msg = JSON.parse(ev.data); } catch { return; }
          if (msg.type === 'hello') {
            this.hello = msg;
            if (!settled) { settled = true; resolve(msg); }
          } else if (msg.type === 'dropped') {
            // The server answers a request it dropped (replaced by a newer one, or its result did not fit the send
            // queue) with this instead of a frame: the oldest request in flight is settled.
            this.inFlight.shift();
            this.dropped += 1;
          } else if (msg.type === 'busy') {
            this.closedReason = 'busy';
            if (!settled) { settled = true; reject(Object.assign(new Error(msg.message), { busy: true })); }
          }
          this.dispatchEvent(new CustomEvent(msg.type, { detail: msg }));
          return;
        }
        const sentAt = this.inFlight.shift();
        this.received += 1;
        const latency = sentAt === undefined ? null : performance.now() - sentAt;
        this.dispatchEvent(new CustomEvent('frame', { detail: { blob: ev.data, latency } }));
      };
      ws.onerror = () => {
        if (!settled) { settled = true; reject(new Error(`cannot connect to ${this.url}`)); }
      };
      ws.onclose = (ev) => {
        this.inFlight = [];
        this.closed = true;
        if (!settled) { settled = true; reject(new Error(`connection closed (${ev.code} ${ev.reason || ''})`)); }
        this.dispatchEvent(new CustomEvent('close', { detail: { code: ev.code, reason: ev.reason || this.closedReason } }));
      };
    });
  }

  get open() { return this.ws && this.ws.readyState === WebSocket.OPEN; }
  get canSend() { return this.open && this.inFlight.length < this.window; }

  // A frame (JPEG Blob) for img2img; in txt2img mode use requestImage().
  sendFrame(blob) {
    if (!this.canSend) return false;
    this.inFlight.push(performance.now());
    this.sent += 1;
    this.ws.send(blob);
    return true;
  }

  requestImage() {
    if (!this.canSend) return false;
    this.inFlight.push(performance.now());
    this.sent += 1;
    this.ws.send(JSON.stringify({ type: 'generate' }));
    return true;
  }

  sendConfig(fields) {
    if (this.open) this.ws.send(JSON.stringify({ type: 'config', ...fields }));
  }

  // An error message answers a frame that will get no result: free its slot.
  forgetOldest() { this.inFlight.shift(); }

  close() {
    if (this.ws) this.ws.close(1000, 'bye');
  }
}
