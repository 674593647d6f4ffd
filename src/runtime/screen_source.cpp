// Compiled without the libtorch precompiled header and with SD_HAVE_X11 when libX11 + XShm were found
// (src/CMakeLists.txt). X11 headers come last: their macros (None, Bool, Status, ...) clash with C++ libraries.
#include "runtime/screen_source.h"

#include <cstdlib>
#include <cstdio>

#include <opencv2/imgproc.hpp>

#include "core/error.h"

#ifdef SD_HAVE_X11
#include <sys/ipc.h>
#include <sys/shm.h>

#include <X11/Xlib.h>
#include <X11/Xutil.h>
#include <X11/extensions/XShm.h>
#endif

namespace sd {

ScreenRegion parse_screen_region(const std::string& spec) {
  ScreenRegion r;
  if (spec == "screen") return r;
  if (spec.rfind("screen:", 0) != 0) throw InvalidArgument("screen source: expected screen or screen:x,y,w,h, got '" + spec + "'");
  const std::string args = spec.substr(7);
  char tail = 0;
  if (std::sscanf(args.c_str(), "%d,%d,%d,%d%c", &r.x, &r.y, &r.width, &r.height, &tail) != 4 || r.x < 0 || r.y < 0 ||
      r.width <= 0 || r.height <= 0)
    throw InvalidArgument("screen source: expected screen:x,y,w,h with x, y >= 0 and w, h > 0, got '" + spec + "'");
  return r;
}

#ifdef SD_HAVE_X11
namespace {
int g_x_error = 0;
int record_x_error(Display*, XErrorEvent* e) {
  g_x_error = e->error_code;
  return 0;
}
}  // namespace

struct ScreenSource::Impl {
  Display* dpy = nullptr;
  ::Window root = 0;
  ScreenRegion region;
  XImage* image = nullptr;
  XShmSegmentInfo shm{};
  bool use_shm = false;
  double fps = 30;
  FramePacer pacer;

  ~Impl() {
    if (use_shm && dpy) {
      XShmDetach(dpy, &shm);
      XSync(dpy, 0);
    }
    if (image) {
      if (use_shm) image->data = nullptr;  // the shared segment is not XDestroyImage's to free (shmdt below)
      XDestroyImage(image);
    }
    if (use_shm && shm.shmaddr) shmdt(shm.shmaddr);
    if (dpy) XCloseDisplay(dpy);
  }
};

ScreenSource::ScreenSource(const ScreenRegion& region, const SourceOptions& options) : impl_(std::make_unique<Impl>()) {
  const char* display = std::getenv("DISPLAY");
  if (!display || !*display)
    throw InvalidArgument("screen capture needs an X11 display, and DISPLAY is not set");
  impl_->dpy = XOpenDisplay(nullptr);
  if (!impl_->dpy) throw InvalidArgument(std::string("screen capture: cannot open the X11 display '") + display + "'");
  XSetErrorHandler(record_x_error);
  Display* dpy = impl_->dpy;
  impl_->root = DefaultRootWindow(dpy);
  XWindowAttributes attr{};
  XGetWindowAttributes(dpy, impl_->root, &attr);
  ScreenRegion r = region;
  if (r.width == 0) {
    r.width = attr.width;
    r.height = attr.height;
  }
  if (r.x + r.width > attr.width || r.y + r.height > attr.height)
    throw InvalidArgument("screen:" + std::to_string(r.x) + "," + std::to_string(r.y) + "," + std::to_string(r.width) +
                          "," + std::to_string(r.height) + " is outside the " + std::to_string(attr.width) + "x" +
                          std::to_string(attr.height) + " screen");
  impl_->region = r;
  impl_->fps = options.fps > 0 ? options.fps : 30.0;
  impl_->pacer.set_fps(impl_->fps);

  if (XShmQueryExtension(dpy)) {
    Impl& m = *impl_;
    m.image = XShmCreateImage(dpy, DefaultVisual(dpy, DefaultScreen(dpy)), DefaultDepth(dpy, DefaultScreen(dpy)),
                              ZPixmap, nullptr, &m.shm, r.width, r.height);
    if (m.image) {
      m.shm.shmid = shmget(IPC_PRIVATE, static_cast<size_t>(m.image->bytes_per_line) * m.image->height, IPC_CREAT | 0600);
      if (m.shm.shmid >= 0) {
        m.shm.shmaddr = m.image->data = static_cast<char*>(shmat(m.shm.shmid, nullptr, 0));
        m.shm.readOnly = 0;
        g_x_error = 0;
        if (m.shm.shmaddr != reinterpret_cast<char*>(-1) && XShmAttach(dpy, &m.shm)) {
          XSync(dpy, 0);
          m.use_shm = g_x_error == 0;  // a remote display accepts the call but fails the attach
        }
        shmctl(m.shm.shmid, IPC_RMID, nullptr);  // freed once both sides detach
      }
      if (!m.use_shm) {
        if (m.shm.shmaddr && m.shm.shmaddr != reinterpret_cast<char*>(-1)) shmdt(m.shm.shmaddr);
        m.shm.shmaddr = nullptr;
        m.image->data = nullptr;
        XDestroyImage(m.image);
        m.image = nullptr;
      }
    }
  }
}

ScreenSource::~ScreenSource() = default;

bool ScreenSource::read(cv::Mat& out, const std::atomic<bool>& stop) {
  Impl& m = *impl_;
  if (!m.pacer.wait(stop)) return false;
  const ScreenRegion& r = m.region;
  XImage* img = nullptr;
  g_x_error = 0;
  if (m.use_shm) {
    if (!XShmGetImage(m.dpy, m.root, m.image, r.x, r.y, AllPlanes) || g_x_error)
      throw Error("screen capture: XShmGetImage failed (X error " + std::to_string(g_x_error) + ")");
    img = m.image;
  } else {
    img = XGetImage(m.dpy, m.root, r.x, r.y, static_cast<unsigned>(r.width), static_cast<unsigned>(r.height), AllPlanes,
                    ZPixmap);
    if (!img) throw Error("screen capture: XGetImage failed (X error " + std::to_string(g_x_error) + ")");
  }
  if (img->bits_per_pixel != 32) {
    const int bpp = img->bits_per_pixel;
    if (!m.use_shm) XDestroyImage(img);
    throw Error("screen capture: unsupported X11 visual with " + std::to_string(bpp) + " bits per pixel (need 32)");
  }
  cv::Mat bgra(r.height, r.width, CV_8UC4, img->data, static_cast<size_t>(img->bytes_per_line));
  cv::cvtColor(bgra, out, cv::COLOR_BGRA2BGR);  // copies out of the X image
  if (!m.use_shm) XDestroyImage(img);
  return true;
}

double ScreenSource::fps() const { return impl_->fps; }

std::string ScreenSource::describe() const {
  const ScreenRegion& r = impl_->region;
  return "screen " + std::to_string(r.x) + "," + std::to_string(r.y) + " " + std::to_string(r.width) + "x" +
         std::to_string(r.height) + (impl_->use_shm ? " (XShm)" : " (XGetImage)");
}

#else  // no X11 in this build

struct ScreenSource::Impl {};

ScreenSource::ScreenSource(const ScreenRegion&, const SourceOptions&) {
  throw InvalidArgument("screen capture needs X11: this build has no libX11/XShm (install libx11-dev libxext-dev "
                        "and rebuild)");
}
ScreenSource::~ScreenSource() = default;
bool ScreenSource::read(cv::Mat&, const std::atomic<bool>&) { return false; }
double ScreenSource::fps() const { return 0; }
std::string ScreenSource::describe() const { return "screen (unavailable)"; }

#endif

}  // namespace sd
