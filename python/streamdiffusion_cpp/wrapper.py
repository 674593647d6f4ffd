"""StreamDiffusionWrapper: upstream StreamDiffusion's ``utils/wrapper.py`` API on the streamdiffusion.cpp engine.

Moving over is a changed import::

    from streamdiffusion_cpp import StreamDiffusionWrapper

Every constructor argument and method of upstream's wrapper is accepted. Where upstream's behaviour is right it is
kept; where it is not, the difference is deliberate and listed in the README ("Python": the mapping from upstream's
wrapper). In short: unset settings come from the model (native size, recommended t_index_list / cfg / guidance /
delta) instead of fixed SD 1.5 numbers; models, LoRAs and TAESD resolve to local paths only (a Hugging Face hub id
is looked up in the local hub cache, never downloaded); acceleration / device_ids / engine_dir /
use_safety_checker are accepted and noted; txt2img accepts any cfg_type and img2img the sequential mode, which the
engine implements.
"""
from __future__ import annotations

import glob
import logging
import os
import random
from typing import Any, Dict, List, Literal, Optional, Union

import numpy as np

from . import _core
from .image_utils import postprocess_image as _postprocess
from .image_utils import preprocess_image as _preprocess

log = logging.getLogger("streamdiffusion_cpp")


def _np_zeros_u8(h: int, w: int):
    return np.zeros((h, w, 3), dtype=np.uint8)


def _picture_u8(image: Any) -> Any:
    """A path or PIL image -> uint8 RGB HWC numpy array; arrays and tensors pass through."""
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"))
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL image
        return np.asarray(image.convert("RGB"))
    return image

_ACCELERATIONS = ("none", "xformers", "tensorrt", "sfast")


def _hub_cache_path(repo_id: str) -> Optional[str]:
    """The newest local snapshot of a Hugging Face hub repository id ("org/name"), or None. Never downloads."""
    if "/" not in repo_id or os.path.exists(repo_id):
        return None
    roots = [os.environ.get("HF_HUB_CACHE"), os.environ.get("HUGGINGFACE_HUB_CACHE")]
    hf_home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    roots.append(os.path.join(hf_home, "hub"))
    folder = "models--" + repo_id.replace("/", "--")
    for root in filter(None, roots):
        snaps = sorted(glob.glob(os.path.join(root, folder, "snapshots", "*")), key=os.path.getmtime)
        if snaps:
            return snaps[-1]
    return None


def resolve_model_path(name: Optional[str]) -> Optional[str]:
    """A local path for a model name: the path itself, else its local hub-cache snapshot; None = the built-in model.

    A name that is neither is returned unchanged, so loading reports it (FormatError naming the path).
    """
    if name is None or name == "":
        return None
    name = os.path.expanduser(str(name))
    return _hub_cache_path(name) or name


def _lora_file(path: str) -> str:
    """A LoRA given as a file, or a folder holding one .safetensors file (diffusers' pytorch_lora_weights...)."""
    path = resolve_model_path(path) or path
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if len(files) == 1:
            return files[0]
        preferred = os.path.join(path, "pytorch_lora_weights.safetensors")
        if os.path.exists(preferred):
            return preferred
        raise _core.InvalidArgument(f"LoRA folder {path} holds {len(files)} .safetensors files; name one")
    return path


def _dtype_name(dtype: Any, device: str) -> str:
    if dtype is None:
        return "auto"  # the engine picks for the device: bf16 / fp16 where it is native, else fp32
    s = str(dtype)
    return s.rsplit(".", 1)[-1] if "." in s else s


class StreamDiffusionWrapper:
    """Upstream's StreamDiffusionWrapper on the C++ engine (same arguments and methods; see the module docstring).

    Images: ``img2img`` takes a path, a PIL image, a uint8 HWC array or a float NCHW tensor in [-1, 1] (any
    ``__dlpack__`` object); results follow ``output_type``: "pil" (PIL image), "pt" (torch NCHW/CHW float in [0, 1]),
    "np" (numpy HWC float32 in [0, 1]), "latent" (the raw decoder output, CHW float in [-1, 1], as upstream returns
    it). With frame_buffer_size > 1 each call takes and returns frame_buffer_size images (a list / a batch).
    """

    def __init__(
        self,
        model_id_or_path: Optional[str] = None,
        t_index_list: Optional[List[int]] = None,
        lora_dict: Optional[Dict[str, float]] = None,
        mode: Literal["img2img", "txt2img"] = "img2img",
        output_type: Literal["pil", "pt", "np", "latent"] = "pil",
        lcm_lora_id: Optional[str] = None,
        vae_id: Optional[str] = None,
        device: Literal["cpu", "cuda"] = "cpu",
        dtype: Any = None,
        frame_buffer_size: int = 1,
        width: Optional[int] = None,
        height: Optional[int] = None,
        warmup: int = 10,
        acceleration: Literal["none", "xformers", "tensorrt"] = "none",
        do_add_noise: bool = True,
        device_ids: Optional[List[int]] = None,
        use_lcm_lora: bool = True,
        use_tiny_vae: bool = True,
        enable_similar_image_filter: bool = False,
        similar_image_filter_threshold: float = 0.98,
        similar_image_filter_max_skip_frame: int = 10,
        use_denoising_batch: bool = True,
        cfg_type: Optional[Literal["none", "full", "self", "initialize"]] = None,
        seed: int = 2,
        use_safety_checker: bool = False,
        engine_dir: Optional[str] = "engines",
        *,
        threads: int = 0,
        controlnets: Optional[List[Union[str, tuple]]] = None,
        controlnet_every: int = 1,
        control_preprocessor: Optional[str] = None,
        ip_adapter: Optional[str] = None,
        ip_adapter_scale: float = 1.0,
        seed_list: Optional[Any] = None,
        prompt_blend: str = "linear",
        transition: Any = 0,
        latent_feedback: float = 0.0,
        config: str = "",
        tokenizer: str = "",
        prediction_type: str = "",
        lcm_guidance: Optional[float] = None,
        clip_skip: int = 0,
        strict_lora: bool = False,
        deep_cache_every: int = 1,
        deep_cache_similarity: float = 0.95,
        cuda_graphs: bool = True,
        variant: str = "",
    ) -> None:
        """Loads the model and prepares an empty prompt, as upstream does.

        model_id_or_path: a diffusers folder or single .safetensors file (a hub id only if it is in the local hub
        cache); None = the built-in emoji model. t_index_list, width, height, cfg_type: None = the model's
        recommendation / native size. dtype: torch dtype or "auto" | "fp32" | "bf16" | "fp16" (None = "auto": bf16 on
        a CPU with AVX512-BF16 or AMX-BF16, fp16 on CUDA, else fp32; self.dtype says which). threads: intra-op
        threads (0 = all cores).

        controlnets: ControlNets as paths, (path, scale) pairs or (path, scale, guidance_start, guidance_end) (diffusers
            folders or control_*.safetensors files),
        residuals summed; controlnet_every: recompute them every N calls. control_preprocessor: "canny[:LOW:HIGH]" |
        "gray" | "passthrough" makes each img2img call's control image from its input frame (else set one with
        set_control_image). ip_adapter: an IP-Adapter file or folder (image prompts: set_image_prompt),
        ip_adapter_scale its weight.

        Live performance controls (also settable later): seed_list [(seed, weight), ...] blends the fixed noise
        (variance-preserving) instead of seed; prompt_blend "linear" | "slerp" for prompt lists (prepare / __call__
        take [(text, weight), ...] as the prompt); transition: how prompt / seed changes morph (seconds, "2.5s" or
        "30f" frames; 0 = at once); latent_feedback A in [0, 1] (img2img): input latent = (1 - A) * encoded frame +
        A * previous output latent.

        As the CLI's options of the same names: config (single-file checkpoints: a diffusers folder of config files),
        tokenizer, prediction_type ("epsilon" | "v_prediction"), lcm_guidance (LCM-distilled UNets), clip_skip,
        strict_lora, deep_cache_every / deep_cache_similarity, cuda_graphs (False = --no-cuda-graphs), variant
        (diffusers' from_pretrained(variant=), e.g. "fp16").
        """
        if mode not in ("img2img", "txt2img"):
            raise _core.InvalidArgument(f"mode must be 'img2img' or 'txt2img', got {mode!r}")
        if output_type not in ("pil", "pt", "np", "latent"):
            raise _core.InvalidArgument(f"output_type must be 'pil', 'pt', 'np' or 'latent', got {output_type!r}")
        if acceleration not in _ACCELERATIONS:
            raise _core.InvalidArgument(f"acceleration must be one of {_ACCELERATIONS}, got {acceleration!r}")
        if acceleration != "none":
            log.warning("acceleration=%r: streamdiffusion.cpp runs its own libtorch path (prepacked CPU "
                        "convolutions, bf16/fp16); %s is not used", acceleration, acceleration)
        if device_ids is not None:
            log.warning("device_ids=%r ignored: one stream runs on one device", device_ids)
        if use_safety_checker:
            log.warning("use_safety_checker=True: no safety checker is available in streamdiffusion.cpp "
                        "(it needs transformers' CLIP vision model); images are returned unfiltered")

        self.device = device
        self.mode = mode
        self.output_type = output_type
        self.frame_buffer_size = frame_buffer_size
        self.use_denoising_batch = use_denoising_batch
        self.use_safety_checker = use_safety_checker
        self.warmup = warmup  # accepted; upstream's wrapper does not use it either (its examples warm up by hand)
        self.model_path = resolve_model_path(model_id_or_path)

        defaults = _core.model_defaults(self.model_path, config or "", prediction_type or "")
        self.model_defaults = defaults
        self.sd_turbo = defaults["family"] in ("sd-turbo", "sdxl-turbo") or "turbo" in str(model_id_or_path or "")

        # LoRAs: the LCM-LoRA first, then lora_dict in order (upstream: load_lcm_lora + fuse, then each lora_dict
        # entry), none of them for turbo models (as upstream).
        loras: List[tuple] = []
        if not self.sd_turbo:
            if use_lcm_lora:
                lcm = lcm_lora_id if lcm_lora_id is not None else _hub_cache_path("latent-consistency/lcm-lora-sdv1-5")
                if lcm is not None:
                    loras.append((_lora_file(lcm), 1.0))
                elif defaults["warnings"]:
                    log.warning("use_lcm_lora=True but no lcm_lora_id was given and latent-consistency/"
                                "lcm-lora-sdv1-5 is not in the local hub cache (nothing is downloaded): running "
                                "without an LCM-LoRA")
            for path, scale in (lora_dict or {}).items():
                loras.append((_lora_file(path), float(scale)))

        if use_tiny_vae:
            taesd = resolve_model_path(vae_id) or "" if vae_id is not None else ""
            vae = ""
        else:
            taesd = "none"
            vae = resolve_model_path(vae_id) or "" if vae_id is not None else ""

        self.models = _core.load_pipeline(self.model_path, dtype=_dtype_name(dtype, device), device=device,
                                          threads=threads, taesd=taesd, vae=vae, loras=loras,
                                          ip_adapter=ip_adapter or "", ip_adapter_scale=float(ip_adapter_scale),
                                          config=config or "", tokenizer=tokenizer or "",
                                          prediction_type=prediction_type or "", lcm_guidance=lcm_guidance,
                                          clip_skip=int(clip_skip), strict_lora=bool(strict_lora),
                                          variant=variant or "")
        self.dtype = self.models.dtype  # what "auto" resolved to: "fp32", "bf16" or "fp16"
        # ControlNets and image prompt: kept here and given to every stream prepare() makes.
        self.controlnets: List[tuple] = []
        for item in controlnets or []:
            # path, (path, scale) or (path, scale, guidance_start, guidance_end)
            path, rest = (item, (1.0,)) if isinstance(item, (str, os.PathLike)) else (item[0], tuple(item[1:]))
            net = _core.ControlNet.load(str(resolve_model_path(str(path)) or path), self.models)
            self.controlnets.append((net,) + tuple(float(v) for v in rest))
        self.controlnet_every = int(controlnet_every)
        if control_preprocessor is not None:
            if not self.controlnets:
                raise _core.InvalidArgument("control_preprocessor needs controlnets")
            if mode != "img2img":
                raise _core.InvalidArgument("control_preprocessor needs input frames (mode='img2img'); in txt2img "
                                            "give the control image with set_control_image")
            _core.control_preprocess(control_preprocessor, _np_zeros_u8(8, 8))  # a bad name fails here
        self.control_preprocessor = control_preprocessor
        self._control_images: Dict[int, Any] = {}
        self._image_prompt: Any = None

        if seed < 0:  # upstream: a random seed
            seed = random.randint(0, 1000000)
        self.config = _core.resolve_config(self.model_path, mode, t_index_list=t_index_list, cfg_type=cfg_type,
                                           width=width, height=height, config=config or "",
                                           prediction_type=prediction_type or "")
        self.config.frame_buffer_size = frame_buffer_size
        self.config.use_denoising_batch = use_denoising_batch
        self.config.do_add_noise = do_add_noise
        if int(deep_cache_every) < 1:
            raise _core.InvalidArgument("deep_cache_every must be >= 1 (1 = off)")
        self.config.deep_cache_every = int(deep_cache_every)
        self.config.deep_cache_min_similarity = float(deep_cache_similarity)
        self.config.cuda_graphs = bool(cuda_graphs)
        self.config.seed = seed
        if seed_list:
            self.config.seed_list = seed_list
        self.config.prompt_blend = prompt_blend
        self.config.transition = transition
        if latent_feedback and mode != "img2img":
            raise _core.InvalidArgument("latent_feedback needs input images (mode='img2img')")
        self.config.latent_feedback = float(latent_feedback)
        if enable_similar_image_filter:
            if mode != "img2img":
                raise _core.InvalidArgument("enable_similar_image_filter needs input images (mode='img2img')")
            self.config.similarity_filter = _core.SimilarityFilterOptions(
                True, similar_image_filter_threshold, similar_image_filter_max_skip_frame)
        self._recommended = (self.config.num_inference_steps, self.config.guidance_scale, self.config.delta)
        self.width = self.config.width
        self.height = self.config.height
        self.t_index_list = list(self.config.t_index_list)
        self.cfg_type = self.config.cfg_type
        self.batch_size = len(self.t_index_list) * frame_buffer_size if use_denoising_batch else frame_buffer_size
        self.stream: _core.Stream = _core.Stream(self.models, self.config)
        # Upstream prepares an empty prompt at load (guidance 1.1 with a cfg, else 1.0; 50 steps).
        self.prepare("", "", guidance_scale=1.1 if self.cfg_type != "none" else 1.0)

    @classmethod
    def from_config(cls, path: Any, *, mode: Optional[str] = None, ignore_cli_only: bool = False,
                    **overrides: Any) -> "StreamDiffusionWrapper":
        """A wrapper from a settings file: the CLI's ``--config FILE.yaml`` (or ``--dump-config`` output) of txt2img,
        img2img, stream or serve, keys = the CLI's long option names (``t_index_list`` = ``t-index-list``).

        The CLI's options map onto the constructor (model -> model_id_or_path, size WxH -> width / height, lora
        FILE[:SCALE] list -> lora_dict, lcm_lora -> lcm_lora_id, no_denoising_batch -> use_denoising_batch=False,
        similarity_filter T -> enable_similar_image_filter + threshold, taesd / vae -> use_tiny_vae + vae_id, ...) and
        onto prepare() (prompt or prompt_list, negative_prompt, num_inference_steps, guidance -> guidance_scale,
        delta), which runs after construction; those three numbers stay the defaults of later prepare() calls. As the
        CLI, no LCM-LoRA is fused unless lcm_lora names one. image_prompt / control_input (image files) are set after
        construction. mode: "img2img" | "txt2img"; else the file's ``mode``, else txt2img for a txt2img dump or a
        stream with ``input: none``, else img2img.

        overrides: constructor or prepare() arguments (t_index_list=[0], guidance_scale=1.5), or settings keys read
        as in a file (size="64x64", guidance=1.3); they win over the file.

        Errors: FormatError (with .file) for a missing file or bad YAML (with the line); InvalidArgument naming the
        file, line, key and expected type for an unknown key (and the closest known one), a wrong type, a list for a
        single-value key, a CLI-only key (input, output, fps, control, serve options, ...; skipped with a warning
        when ignore_cli_only=True) or one the wrapper cannot do (steps).
        """
        from .settings import from_config

        return from_config(cls, path, mode=mode, ignore_cli_only=ignore_cli_only, **overrides)

    def prepare(self, prompt: Any, negative_prompt: str = "", num_inference_steps: Optional[int] = None,
                guidance_scale: Optional[float] = None, delta: Optional[float] = None) -> None:
        """Encodes the prompts and builds every cache (resets the stream, as upstream's prepare).

        prompt: a str ("(word:1.3)" / "[word]" weights allowed) or a prompt list [(text, weight), ...].
        num_inference_steps, guidance_scale, delta: None = the model's recommendation (upstream: 50, 1.2, 1.0).
        """
        steps, guidance, dlt = self._recommended
        self.config.num_inference_steps = int(num_inference_steps) if num_inference_steps is not None else steps
        self.config.guidance_scale = float(guidance_scale) if guidance_scale is not None else guidance
        self.config.delta = float(delta) if delta is not None else dlt
        self.stream = _core.Stream(self.models, self.config)
        self.stream.prepare(prompt, negative_prompt)
        self._attach()

    def _attach(self) -> None:
        """Gives the current stream the ControlNets, their control images and the image prompt."""
        if self.controlnets:
            self.stream.set_controlnets(self.controlnets)
            self.stream.set_controlnet_every(self.controlnet_every)
            for i, image in self._control_images.items():
                self.stream.set_control_image(i, image)
        if self._image_prompt is not None:
            self.stream.set_image_prompt(self._image_prompt)

    def set_control_image(self, index: int, image: Any) -> None:
        """Control image of ControlNet `index`: a path, PIL image, uint8 HWC array or float CHW in [0, 1]."""
        if not 0 <= index < len(self.controlnets):
            raise _core.InvalidArgument(f"set_control_image: index {index} out of range ({len(self.controlnets)} "
                                        "ControlNets)")
        image = _picture_u8(image)
        self.stream.set_control_image(index, image)
        self._control_images[index] = image

    def set_controlnet_scale(self, index: int, scale: float) -> None:
        """Conditioning scale of ControlNet `index` (0 = as without it)."""
        self.stream.set_controlnet_scale(index, float(scale))
        unit = self.controlnets[index]
        self.controlnets[index] = (unit[0], float(scale)) + tuple(unit[2:])  # the guidance range, if given, stays

    def set_controlnet_guidance(self, index: int, start: float, end: float) -> None:
        """control_guidance_start / _end of ControlNet `index` (0 <= start < end <= 1): the share of the steps it
        conditions."""
        self.stream.set_controlnet_guidance(index, float(start), float(end))
        unit = self.controlnets[index]
        self.controlnets[index] = (unit[0], unit[1], float(start), float(end))

    def set_image_prompt(self, image: Any) -> None:
        """IP-Adapter image prompt (ip_adapter=): a path, PIL image or uint8 HWC array."""
        image = _picture_u8(image)
        self.stream.set_image_prompt(image)
        self._image_prompt = image

    def set_ip_adapter_scale(self, scale: float) -> None:
        """Weight of the IP-Adapter's image attention (0 = off)."""
        self.models.set_ip_adapter_scale(float(scale))

    # ---- live performance controls (kept in self.config, so a later prepare() keeps them) ----
    def _update_prompt(self, prompt: Any) -> None:
        if isinstance(prompt, str):
            self.stream.update_prompt(prompt)
        else:
            self.stream.set_prompt_list(prompt)

    def set_prompt_list(self, prompts: Any) -> None:
        """Weighted prompt blend [(text, weight), ...] or {text: weight}; morphs with the transition."""
        self.stream.set_prompt_list(prompts)

    def set_seed_list(self, seeds: Any) -> None:
        """Fixed noise from a weighted seed list [(seed, weight), ...] (variance-preserving); morphs with the
        transition."""
        self.stream.set_seed_list(seeds)
        self.config.seed_list = seeds

    def set_seed(self, seed: int) -> None:
        """A new seed (morphs with the transition)."""
        self.stream.set_seed(int(seed))
        self.config.seed = int(seed)
        self.config.seed_list = []

    def set_transition(self, transition: Any) -> None:
        """How later prompt / seed changes morph: seconds (a number or "2.5s"), frames ("30f"), 0 = at once."""
        self.stream.set_transition(transition)
        self.config.transition = transition

    def set_prompt_blend(self, method: str) -> None:
        """"linear" | "slerp"."""
        self.stream.set_prompt_blend(method)
        self.config.prompt_blend = method

    def set_latent_feedback(self, amount: float) -> None:
        """Latent feedback A in [0, 1] (img2img); 0 = off."""
        self.stream.set_latent_feedback(float(amount))
        self.config.latent_feedback = float(amount)

    def __call__(self, image: Any = None, prompt: Optional[str] = None):
        """img2img(image, prompt) in img2img mode, else txt2img(prompt)."""
        if self.mode == "img2img":
            return self.img2img(image, prompt)
        return self.txt2img(prompt)

    def txt2img(self, prompt: Optional[str] = None):
        """One txt2img step (turbo models: the one-shot batch, as upstream's txt2img_sd_turbo)."""
        if prompt is not None:
            self._update_prompt(prompt)
        if self.sd_turbo and self.use_denoising_batch:
            out = self.stream.txt2img_one_shot()
        else:
            out = self.stream.txt2img()
        return self.postprocess_image(out, output_type=self.output_type)

    def img2img(self, image: Any, prompt: Optional[str] = None):
        """One img2img step. image: a path, PIL image (or a list of frame_buffer_size of them), uint8 HWC array,
        or float NCHW / CHW tensor in [-1, 1] (any __dlpack__ object; not copied)."""
        if image is None:
            raise _core.InvalidArgument("img2img: an image is required (mode='img2img')")
        if prompt is not None:
            self._update_prompt(prompt)
        x = self.preprocess_image(image)
        if self.control_preprocessor is not None:
            # The control image of this frame (the first one with frame_buffer_size > 1), from the stream input.
            frame = np.asarray(_core.tensor_to_image(x if len(x.shape) == 4 else np.asarray(x)[None]))[0]
            control = _core.control_preprocess(self.control_preprocessor, frame)
            for i in range(len(self.controlnets)):
                self.stream.set_control_image(i, control)
        out = self.stream.img2img(x)
        return self.postprocess_image(out, output_type=self.output_type)

    def preprocess_image(self, image: Any) -> _core.Tensor:
        """Path / PIL -> float32 NCHW [1, 3, H, W] in [-1, 1], centre-cropped and resized to the stream size
        (upstream stretches); tensors pass through unchanged (no copy)."""
        return _preprocess(image, self.width, self.height)

    def postprocess_image(self, image_tensor: Any, output_type: str = "pil"):
        """Decoder output NCHW in [-1, 1] -> output_type; the first image unless frame_buffer_size > 1 (upstream)."""
        out = _postprocess(image_tensor, output_type)
        return out if self.frame_buffer_size > 1 else out[0]
