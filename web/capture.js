// Camera (getUserMedia) and screen / tab (getDisplayMedia) capture, grabbed as JPEG frames at the stream size.

export async function openSource(kind) {
  if (kind === 'camera') {
    if (!navigator.mediaDevices?.getUserMedia) throw new CaptureError('This browser has no camera access here (a page served over plain http needs localhost).');
    try {
      return await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 }, height: { ideal: 480 } }, audio: false });
    } catch (e) {
      throw new CaptureError(describe(e, 'camera'));
    }
  }
  if (kind === 'screen') {
    if (!navigator.mediaDevices?.getDisplayMedia) throw new CaptureError('This browser cannot share a screen or tab.');
    try {
      return await navigator.mediaDevices.getDisplayMedia({ video: { frameRate: 30 }, audio: false });
    } catch (e) {
      throw new CaptureError(describe(e, 'screen'));
    }
  }
  return null;
}

export class CaptureError extends Error {}

function describe(e, what) {
  const name = e && e.name;
  if (name === 'NotAllowedError' || name === 'SecurityError')
    return what === 'camera'
      ? 'Camera access was refused. Allow the camera for this site (the camera icon in the address bar), or use Screen / tab or Text only.'
      : 'Screen sharing was cancelled or refused.';
  if (name === 'NotFoundError' || name === 'OverconstrainedError') return `No ${what} was found.`;
  if (name === 'NotReadableError') return `The ${what} is in use by another program.`;
  return `Cannot open the ${what}: ${e && e.message ? e.message : e}`;
}

// Draws the centre crop of `video` with the stream's aspect ratio into a canvas of the stream size, as JPEG.
export class FrameGrabber {
  constructor(width, height, quality = 0.8) {
    this.canvas = document.createElement('canvas');
    this.canvas.width = width;
    this.canvas.height = height;
    this.ctx = this.canvas.getContext('2d');
    this.quality = quality;
  }

  grab(video) {
    const vw = video.videoWidth, vh = video.videoHeight;
    if (!vw || !vh) return Promise.resolve(null);
    const W = this.canvas.width, H = this.canvas.height;
    let sw = vw, sh = vh;
    if (vw * H > vh * W) sw = Math.round((vh * W) / H); else sh = Math.round((vw * H) / W);
    this.ctx.drawImage(video, (vw - sw) / 2, (vh - sh) / 2, sw, sh, 0, 0, W, H);
    return new Promise((resolve) => this.canvas.toBlob(resolve, 'image/jpeg', this.quality));
  }
}
