"""Type stubs of the extension module streamdiffusion_cpp._core (see the package docstring for layouts)."""
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

__version__: str
HAVE_RUNTIME: bool

class Error(RuntimeError):
    """Any engine error (base of InvalidArgument and FormatError); str(e) is the C++ message."""

class InvalidArgument(Error, ValueError):
    """A bad argument: size, option, t_index_list, image shape."""

class FormatError(Error, OSError):
    """A missing or malformed model file or folder; .file names it."""

class Tensor:
    """An engine tensor, exported without copies (__dlpack__, __array_interface__).

    Model-side images are NCHW float in [-1, 1]; tensor_to_image() output is uint8 NHWC RGB.
    """
    def __init__(self, obj: Any) -> None: ...
    def __dlpack__(self, stream: Optional[int] = ...) -> Any: ...
    def __dlpack_device__(self) -> Tuple[int, int]: ...
    @property
    def __array_interface__(self) -> Dict[str, Any]: ...
    @property
    def shape(self) -> Tuple[int, ...]: ...
    @property
    def dtype(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def ndim(self) -> int: ...
    def data_ptr(self) -> int: ...
    def numel(self) -> int: ...
    def float(self) -> "Tensor": ...
    def cpu(self) -> "Tensor": ...
    def contiguous(self) -> "Tensor": ...
    def clone(self) -> "Tensor": ...
    def tolist(self) -> List[float]: ...
    def __len__(self) -> int: ...

TensorLike = Any  # any object with __dlpack__ (torch.Tensor, numpy.ndarray, ...) or a numpy-viewable object
# [(text, weight), ...], {text: weight}, or the text form "a cat:1 | a dog:0.5"
PromptList = Union[Sequence[Union[str, Tuple[str, float]]], Dict[str, float], str]
# [(seed, weight), ...], {seed: weight}, or the text form "1:0.7, 2:0.3"
SeedList = Union[Sequence[Union[int, Tuple[int, float]]], Dict[int, float], str]

def as_tensor(obj: TensorLike) -> Tensor:
    """Wraps a tensor-like object without copying."""

class Models:
    """A loaded, immutable model set shared by any number of Streams."""
    @property
    def dtype(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def vae_scale_factor(self) -> int: ...
    @property
    def latent_channels(self) -> int: ...
    def describe(self) -> str: ...
    @property
    def variant(self) -> str: ...
    def loras(self) -> List[Dict[str, Any]]:
        """The fused LoRAs in load order: name, path, layout, scale, keys, matched_keys, methods (beyond plain LoRA,
        sorted, e.g. ["DoRA", "LoHa"]; [] for a plain LoRA), ranks (distinct, ascending), modules (component -> patched
        module paths, file order), unmatched_keys (keys that patch nothing, file order)."""
    def set_lora_scale(self, name: str, scale: float) -> None: ...
    @property
    def has_ip_adapter(self) -> bool: ...
    def set_ip_adapter_scale(self, scale: float) -> None:
        """Weight of the IP-Adapter's image attention (0 = the plain UNet); InvalidArgument without one."""

def load_pipeline(
    model: Optional[str] = None,
    *,
    dtype: Any = "auto",
    device: str = "cpu",
    threads: int = 0,
    taesd: str = "",
    vae: str = "",
    config: str = "",
    tokenizer: str = "",
    prediction_type: str = "",
    loras: Union[None, Dict[str, float], Sequence[Union[str, Tuple[str, float]]]] = None,
    lcm_lora: Optional[str] = None,
    strict_lora: bool = False,
    lora_live: bool = True,
    clip_skip: int = 0,
    lcm_guidance: Optional[float] = None,
    ip_adapter: str = "",
    ip_adapter_scale: float = 1.0,
    variant: str = "",
) -> Models:
    """Loads a diffusers folder or single-file checkpoint (None = the built-in emoji model); ip_adapter: an
    IP-Adapter file or folder (image prompts: Stream.set_image_prompt); variant: diffusers' from_pretrained(variant=),
    e.g. "fp16" (<stem>.fp16.safetensors where a component folder has it, else its plain weights)."""

class ControlNet:
    """A ControlNet loaded for a model set (checked against its UNet's family); shared by any number of Streams."""
    @staticmethod
    def load(path: str, models: Models) -> "ControlNet":
        """Diffusers folder or control_*.safetensors file; FormatError / InvalidArgument (another family)."""
    @property
    def path(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def image_scale(self) -> int: ...
    def describe(self) -> str: ...

def control_preprocess(name: str, image: TensorLike) -> Any:
    """'canny[:LOW:HIGH]' | 'gray' | 'passthrough' on uint8 RGB [H, W, 3] -> numpy uint8 RGB [H, W, 3]."""
def control_preprocessor_names() -> List[str]: ...

def default_model_dir() -> str: ...
def set_threads(n: int) -> int: ...
def model_defaults(model: Optional[str] = None, config: str = "", prediction_type: str = "") -> Dict[str, Any]: ...
def load_safetensors(path: str) -> Dict[str, Tensor]: ...
def image_to_tensor(image: TensorLike, height: int = 0, width: int = 0) -> Tensor:
    """uint8 RGB [H, W, 3] / [N, H, W, 3] -> float32 NCHW [N, 3, H, W] in [-1, 1]."""
def tensor_to_image(images: TensorLike) -> Tensor:
    """NCHW [N, 3, H, W] in [-1, 1] -> uint8 RGB [N, H, W, 3]."""

class SimilarityFilterOptions:
    enabled: bool
    threshold: float
    max_skip_frame: int
    sleep_on_skip: bool
    def __init__(self, enabled: bool = False, threshold: float = 0.98, max_skip_frame: int = 10,
                 sleep_on_skip: bool = True) -> None: ...

class StreamConfig:
    t_index_list: List[int]
    num_inference_steps: int
    cfg_type: str
    guidance_scale: float
    delta: float
    frame_buffer_size: int
    use_denoising_batch: bool
    do_add_noise: bool
    width: int
    height: int
    seed: int
    similarity_filter: SimilarityFilterOptions
    original_frame_layout: bool
    seed_list: List[Tuple[int, float]]  # set with a SeedList; [] = seed alone
    prompt_blend: str  # "linear" | "slerp"
    transition: str  # set with seconds or "2.5s" / "30f"; reads "0", "2.5s", "30f"
    latent_feedback: float
    deep_cache_every: int
    deep_cache_min_similarity: float
    cuda_graphs: bool  # CUDA: UNet / TAESD recorded once per shape and replayed
    sync_components: bool
    def __init__(self) -> None: ...

def resolve_config(
    model: Optional[str] = None,
    mode: str = "img2img",
    *,
    t_index_list: Optional[List[int]] = None,
    num_inference_steps: Optional[int] = None,
    cfg_type: Optional[str] = None,
    guidance_scale: Optional[float] = None,
    delta: Optional[float] = None,
    width: Optional[int] = None,
    height: Optional[int] = None,
    config: str = "",
    prediction_type: str = "",
) -> StreamConfig:
    """StreamConfig with unset settings from the model (as the CLI resolves them)."""

class StreamStats:
    calls: int
    processed: int
    skipped: int
    forced: int
    unet_calls: int
    unet_rows: int
    text_encodes: int
    controlnet_calls: int
    controlnet_reused: int
    image_prompt_encodes: int
    unet_shallow_calls: int
    deep_cache_forced: int
    graph_replays: int
    graph_captures: int
    graph_failures: int
    batched_calls: int
    controlnet_s: float
    text_encode_s: float
    image_encode_s: float
    unet_s: float
    decode_s: float
    total_s: float
    ema_call_s: float

class Rng: ...
class TorchRng(Rng):
    def __init__(self, seed: int = 2) -> None: ...
class ReplayRng(Rng):
    def __init__(self, draws: Sequence[TensorLike], source: str = "replay") -> None: ...
    @property
    def consumed(self) -> int: ...
    @property
    def remaining(self) -> int: ...
class UniformSource: ...
class Mt19937UniformSource(UniformSource):
    def __init__(self, seed: int = 0) -> None: ...
class ReplayUniformSource(UniformSource):
    def __init__(self, values: Sequence[float]) -> None: ...
    @property
    def consumed(self) -> int: ...

class Stream:
    """One stream on a Models set. Images in/out: NCHW float in [-1, 1]."""
    def __init__(self, models: Models, config: StreamConfig = ..., rng: Optional[Rng] = None,
                 uniform: Optional[UniformSource] = None) -> None: ...
    def prepare(self, prompt: Union[str, PromptList], negative_prompt: str = "") -> None:
        """prompt: a str ("(word:1.3)" / "[word]" weights allowed) or a prompt list [(text, weight), ...]."""
    @property
    def prepared(self) -> bool: ...
    def set_prompt_list(self, prompts: PromptList) -> None:
        """Weighted prompt blend (normalised weights), on cached embeddings; morphs with the transition."""
    @property
    def prompt_list(self) -> List[Tuple[str, float]]: ...
    @property
    def effective_prompts(self) -> List[Tuple[str, float]]: ...
    def set_negative_prompt(self, negative_prompt: str) -> None: ...
    def set_seed_list(self, seeds: SeedList) -> None:
        """init_noise = sum w_i N_i / sqrt(sum w_i^2) (normalised weights); morphs with the transition."""
    @property
    def effective_seeds(self) -> List[Tuple[int, float]]: ...
    def set_transition(self, transition: Union[float, str]) -> None:
        """Seconds (a number or "2.5s"), frames ("30f"), 0 = at once."""
    @property
    def transition_active(self) -> bool: ...
    def set_prompt_blend(self, method: str) -> None: ...
    def set_latent_feedback(self, amount: float) -> None: ...
    def img2img(self, images: TensorLike) -> Tensor:
        """[F, 3, H, W] (or [3, H, W]) float in [-1, 1] -> [F, 3, H, W] in about [-1, 1] (n-1 calls late)."""
    def txt2img(self) -> Tensor: ...
    def txt2img_one_shot(self) -> Tensor: ...
    def update_prompt(self, prompt: str, negative_prompt: Optional[str] = None) -> None: ...
    def set_guidance_scale(self, guidance_scale: float) -> None: ...
    def set_delta(self, delta: float) -> None: ...
    def set_t_index_list(self, t_index_list: List[int]) -> None: ...
    def set_seed(self, seed: int) -> None: ...
    def set_similarity_filter(self, enabled: Union[None, bool, SimilarityFilterOptions] = None,
                              threshold: Optional[float] = None, max_skip_frame: Optional[int] = None) -> None: ...
    @property
    def config(self) -> StreamConfig: ...
    @property
    def stats(self) -> StreamStats: ...
    @property
    def models(self) -> Models: ...
    @property
    def prompt(self) -> str: ...
    @property
    def negative_prompt(self) -> str: ...
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def frame_buffer_size(self) -> int: ...
    @property
    def denoising_steps(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def unet_batch_size(self) -> int: ...
    @property
    def guidance_scale(self) -> float: ...
    @property
    def delta(self) -> float: ...
    @property
    def timesteps(self) -> List[int]: ...
    @property
    def sub_timesteps(self) -> List[int]: ...
    @property
    def last_skipped(self) -> bool: ...
    @property
    def init_noise(self) -> Optional[Tensor]: ...
    @property
    def stock_noise(self) -> Optional[Tensor]: ...
    @property
    def latent_buffer(self) -> Optional[Tensor]: ...
    @property
    def prompt_embeds(self) -> Optional[Tensor]: ...
    @property
    def cond_embeds(self) -> Optional[Tensor]: ...
    @property
    def uncond_embeds(self) -> Optional[Tensor]: ...
    @property
    def alpha_prod_t_sqrt(self) -> Optional[Tensor]: ...
    @property
    def beta_prod_t_sqrt(self) -> Optional[Tensor]: ...
    def _time_img2img_native(self, images: TensorLike, n: int) -> List[float]: ...
    # ControlNets: run before every UNet call, residuals summed; each needs a control image.
    def set_controlnets(
        self,
        controlnets: Sequence[Union[ControlNet, Tuple[ControlNet, float], Tuple[ControlNet, float, float, float]]],
    ) -> None: ...
    @property
    def controlnets(self) -> List[Tuple[ControlNet, float]]: ...
    def set_controlnet_scale(self, index: int, scale: float) -> None: ...
    @property
    def controlnet_guidance(self) -> List[Tuple[float, float]]: ...
    def set_controlnet_guidance(self, index: int, start: float, end: float) -> None: ...
    def set_control_image(self, index: int, image: TensorLike) -> None:
        """uint8 RGB [H, W, 3] or float [3, H, W] / [1, 3, H, W] in [0, 1]; any size."""
    def set_controlnet_every(self, n: int) -> None: ...
    @property
    def controlnet_every(self) -> int: ...
    # IP-Adapter (models loaded with ip_adapter=).
    def set_image_prompt(self, image: TensorLike) -> None:
        """uint8 RGB [H, W, 3], any size."""
    def clear_image_prompt(self) -> None: ...
    @property
    def has_image_prompt(self) -> bool: ...

class StreamBatcher:
    """Many streams, one UNet call: run() makes one call of each Stream given, the UNet rows of all the streams that
    can share a call in ONE UNet call (one TAESD encode and one decode for the group), as `serve` batches clients."""
    def __init__(self, *, max_streams: int = 0, batch_decode: bool = True) -> None: ...
    def run(
        self,
        calls: Sequence[Union[Stream, Tuple[Stream, Optional[TensorLike]]]],
        *,
        return_exceptions: bool = False,
    ) -> List[Union[Tensor, BaseException]]: ...
    @property
    def stats(self) -> Dict[str, int]: ...
    @property
    def max_streams(self) -> int: ...

def run_stream(
    stream: Stream,
    source: str = "none",
    sink: str = "none",
    *,
    callback: Optional[Callable[[Tensor, int], Union[None, bool, str]]] = None,
    mode: str = "auto",
    max_frames: int = 0,
    fps: float = 0.0,
    realtime: bool = False,
    loop: bool = False,
    resize: str = "crop",
    input_size: Optional[Tuple[int, int]] = None,
    output_fps: float = 0.0,
    status_interval: float = 0.0,
) -> Dict[str, Any]:
    """Runs a prepared Stream in the real-time runtime (GIL released; Ctrl-C stops it cleanly)."""

# Settings files (streamdiffusion_cpp.load_settings / StreamDiffusionWrapper.from_config).
HAVE_SETTINGS: bool  # False in engine-only builds (no yaml-cpp): read_settings is absent

def read_settings(path: str) -> List[Tuple[str, List[str], bool, int]]:
    """A settings file (YAML, as the CLI's --config FILE): [(key, values, is_list, line), ...] in file order, keys
    normalised (t-index-list -> t_index_list), values as text. FormatError (file, line) for a missing file / bad YAML."""

def parse_prompt_list(text: str) -> List[Tuple[str, float]]:
    """'a cat:1 | a dog:0.5' or JSON [["a cat", 1], ...] (the CLI's --prompt-list) -> [(text, weight), ...]."""
