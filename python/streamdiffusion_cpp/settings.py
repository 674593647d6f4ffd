"""Settings files in Python: the CLI's ``--config FILE.yaml`` files (and its ``--dump-config`` output) for
:class:`StreamDiffusionWrapper`.

A settings file is YAML, one ``key: value`` per CLI option, keys = the CLI's long option names without dashes
(``t-index-list`` and ``t_index_list`` are the same key)::

    # live.yaml
    model: models/sd-turbo
    prompt: "oil painting of a harbour"
    guidance: 1.2
    t_index_list: "32,45"                     # or a YAML list: [32, 45]
    size: 512x512
    lora: [style.safetensors:0.8, detail.safetensors]

:func:`load_settings` reads one (the CLI's own YAML reader, so a syntax error names the file and line exactly as the
CLI does); :meth:`StreamDiffusionWrapper.from_config` builds a wrapper from one, keyword arguments overriding the
file. Keys the wrapper has no use for (the CLI's input / output / serve / runtime options) are an error, or skipped
with a warning with ``ignore_cli_only=True``. Every error names the file, the line, the key and what was expected.
"""
from __future__ import annotations

import difflib
import math
import os
import re
import warnings
from typing import Any, Dict, List, Optional, Tuple

from . import _core

# ---- the keys --------------------------------------------------------------------------------------------------
# Every option of `streamdiffusion txt2img | img2img | stream | serve` (apps/cli) is one of: a wrapper setting
# (_TYPES: how its value is read), a CLI-only option (_CLI_ONLY: what it is for), or unsupported (_UNSUPPORTED: it
# changes the result and the wrapper cannot do it). A test checks that the CLI's dumps hold no other key.

_TYPES: Dict[str, str] = {
    # loading
    "model": "text", "taesd": "text", "vae": "text", "config": "text", "tokenizer": "text", "variant": "text",
    "prediction_type": "epsilon|v_prediction", "lora": "list", "lcm_lora": "text", "strict_lora": "bool",
    "clip_skip": "int", "text_encoder_clip_skip": "int", "lcm_guidance": "float",
    "ip_adapter": "text", "ip_adapter_scale": "float", "image_prompt": "text",
    "controlnet": "list", "control_preprocessor": "list", "control_input": "text", "controlnet_every": "int",
    "control_guidance_start": "float_list", "control_guidance_end": "float_list",
    "threads": "int", "dtype": "text", "device": "text",
    # the stream
    "mode": "text", "t_index_list": "index_list", "num_inference_steps": "int",
    "cfg_type": "none|full|self|initialize", "seed": "uint", "size": "size", "frame_buffer_size": "int",
    "no_denoising_batch": "bool", "no_add_noise": "bool", "deep_cache_every": "int", "deep_cache_similarity": "float",
    "no_cuda_graphs": "bool", "similarity_filter": "float", "max_skip_frame": "int", "seed_list": "text",
    "transition": "text", "prompt_blend": "linear|slerp", "latent_feedback": "float",
    # prepare()
    "prompt": "text", "negative_prompt": "text", "prompt_list": "text", "guidance": "float", "delta": "float",
}

_CLI_ONLY: Dict[str, str] = {
    **{k: "a txt2img / img2img command option (the wrapper's calls take and return the images)"
       for k in ("input", "output", "warmup", "one_shot")},
    **{k: "a `streamdiffusion stream` runtime option (sources, sinks, queues, control channels)"
       for k in ("input_size", "input_fps", "loop", "realtime", "sync", "resize", "frames", "output_fps", "fourcc",
                 "control", "at", "stats_json", "status_interval", "queue", "warmup_outputs", "watchdog",
                 "fixed_threads", "image_prompt_input", "image_prompt_every", "image_prompt_change")},
    **{k: "a `streamdiffusion serve` server option"
       for k in ("host", "port", "web_root", "max_streams", "max_size", "max_ws_message", "max_http_body",
                 "allow_origin", "io_threads", "max_api_pending", "max_batch_streams", "send_queue", "jpeg_quality",
                 "worker_id", "drain_seconds")},
    "log_level": "a CLI logging option (Python: the 'streamdiffusion_cpp' logger)",
    "compiled_unet": "a CLI option of libtorch 2.11+ builds (the Python module, on Debian's libtorch 1.13, cannot "
                     "load compiled UNets; the same numbers without it)",
}

_UNSUPPORTED: Dict[str, str] = {
    "steps": "not supported by the Python wrapper: give t_index_list instead",
    "start_index": "not supported by the Python wrapper (it goes with steps): give t_index_list instead",
}

_KNOWN = sorted(set(_TYPES) | set(_CLI_ONLY) | set(_UNSUPPORTED))

_EXPECTED = {
    "int": "an integer", "uint": "an integer >= 0", "float": "a number", "bool": "true or false", "text": "text",
    "size": "WIDTHxHEIGHT (e.g. 512x512)", "index_list": "integers, e.g. \"32,45\" or [32, 45]",
    "list": "text, or a list of them", "float_list": "a number, or a list of them",
}

_HEADER = re.compile(r"^#\s*streamdiffusion\s+(\S+)\s+settings\b")
_INT = re.compile(r"^[+-]?[0-9]+$")
_UINT = re.compile(r"^\+?[0-9]+$")
_FLOAT = re.compile(r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$")
_SIZE = re.compile(r"^([0-9]+)x([0-9]+)$")


def settings_key(name: str) -> str:
    """"--t-index-list" / "t-index-list" / "t_index_list" -> "t_index_list" (the form dumps write)."""
    return str(name).lstrip("-").replace("-", "_")


class Settings(dict):
    """A settings file's keys (normalised: ``t_index_list``) -> value: text, or a list of texts where the file gave a
    YAML list. ``file``: the path; ``lines[key]``: the key's line; ``command``: the CLI command a ``--dump-config``
    header names ("txt2img", "img2img", "stream", "serve"), else None."""

    def __init__(self, file: str) -> None:
        super().__init__()
        self.file = file
        self.lines: Dict[str, int] = {}
        self.command: Optional[str] = None

    def where(self, key: str) -> str:
        line = self.lines.get(key)
        return f"{self.file}: line {line}: " if line else f"{self.file}: "


def load_settings(path: Any) -> Settings:
    """Reads a settings file (the CLI's YAML reader): :class:`Settings`, keys normalised, values as text.

    FormatError (with ``.file``) for a missing or unreadable file and for bad YAML (with the line). The keys are not
    checked here; :meth:`StreamDiffusionWrapper.from_config` checks them.
    """
    path = os.fspath(path)
    if not getattr(_core, "HAVE_SETTINGS", False):
        raise _core.Error("settings files need the CLI's YAML reader (yaml-cpp), which this build (engine-only) lacks")
    out = Settings(path)
    for key, values, is_list, line in _core.read_settings(path):
        out[key] = list(values) if is_list else values[0]
        out.lines[key] = line
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            m = _HEADER.match(f.readline())
        out.command = m.group(1) if m else None
    except OSError:
        pass
    return out


# ---- values ------------------------------------------------------------------------------------------------------

class _Bad(Exception):
    pass


def _convert(kind: str, value: Any, is_list: bool) -> Any:
    """The value of a key of type `kind` (texts from the file; raises _Bad(got) when it does not fit)."""
    if kind == "list":
        return list(value) if is_list else [value]
    if kind == "float_list":
        items = list(value) if is_list else [value]
        for s in items:
            if not _FLOAT.match(s.strip()) or not math.isfinite(float(s)):
                raise _Bad(repr(s))
        return [float(s) for s in items]
    if kind == "index_list":
        items = value if is_list else [s for s in value.split(",")]
        out = []
        for s in items:
            s = s.strip()
            if not _INT.match(s):
                raise _Bad(repr(s))
            out.append(int(s))
        if not out:
            raise _Bad("an empty list")
        return out
    if is_list:
        raise _Bad(f"a list of {len(value)} (only repeatable options take lists)")
    if kind == "int" or kind == "uint":
        if not (_INT if kind == "int" else _UINT).match(value):
            raise _Bad(repr(value))
        return int(value)
    if kind == "float":
        if not _FLOAT.match(value) or not math.isfinite(float(value)):
            raise _Bad(repr(value))
        return float(value)
    if kind == "bool":
        low = value.lower()
        if low in ("true", "yes", "on", "1"):
            return True
        if low in ("false", "no", "off", "0"):
            return False
        raise _Bad(repr(value))
    if kind == "size":
        m = _SIZE.match(value)
        if not m:
            raise _Bad(repr(value))
        return int(m.group(1)), int(m.group(2))
    if "|" in kind:
        if value not in kind.split("|"):
            raise _Bad(repr(value))
        return value
    return value  # text


def _expected(kind: str) -> str:
    if "|" in kind:
        return "one of " + ", ".join(kind.split("|"))
    return _EXPECTED[kind]


def _as_text(value: Any) -> Tuple[Any, bool]:
    """A Python override value -> (text or list of texts, is_list), as a file would give it."""
    if isinstance(value, (list, tuple)):
        return [_as_text(v)[0] for v in value], True
    if isinstance(value, bool):
        return ("true" if value else "false"), False
    return str(value), False


def _spec_with_scale(spec: str) -> Tuple[str, float]:
    """"PATH[:SCALE]" -> (path, scale): the text after the last ':' is the scale when it is a number (as the CLI's
    --lora / --controlnet); an existing file is taken whole."""
    if os.path.exists(spec):
        return spec, 1.0
    path, sep, tail = spec.rpartition(":")
    if sep and path and _FLOAT.match(tail):
        return path, float(tail)
    return spec, 1.0


# ---- settings -> wrapper arguments ---------------------------------------------------------------------------------

_PREPARE_KEYS = ("prompt", "negative_prompt", "prompt_list", "num_inference_steps", "guidance", "delta")


def wrapper_arguments(settings: Settings, *, ignore_cli_only: bool = False, _stacklevel: int = 2) -> Dict[str, Any]:
    """Checks a settings file's keys and converts them: {"init": __init__ kwargs, "prepare": prepare() kwargs,
    "after": {"image_prompt": path, "control_input": path}, "mode": mode or None, "skipped": [keys]}.

    InvalidArgument naming the file, the line, the key and the expected type for an unknown key (with the closest
    known one), a value of the wrong type, a list for a single-value key, a CLI-only key (unless ignore_cli_only).
    """
    values: Dict[str, Any] = {}
    skipped: List[str] = []
    mode: Optional[str] = None
    for key, value in settings.items():
        where = settings.where(key)
        is_list = isinstance(value, list)
        if key == "mode" and not is_list and value in ("auto", "live", "lossless"):
            kind = None  # stream's queue policy, not img2img / txt2img
            reason = "a `streamdiffusion stream` runtime option (auto | live | lossless queue policy)"
        elif key in _TYPES:
            kind, reason = _TYPES[key], ""
        elif key in _CLI_ONLY:
            kind, reason = None, _CLI_ONLY[key]
        elif key in _UNSUPPORTED:
            raise _core.InvalidArgument(f"{where}key '{key}': {_UNSUPPORTED[key]}")
        else:
            close = difflib.get_close_matches(key, _KNOWN, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise _core.InvalidArgument(f"{where}unknown key '{key}'{hint}; the keys are the CLI's long options "
                                        "without dashes (streamdiffusion <command> --help)")
        if kind is None:
            if key == "input" and value == "none":
                mode = mode or "txt2img"  # `stream --input none`: a txt2img stream
            if not ignore_cli_only:
                raise _core.InvalidArgument(f"{where}key '{key}': {reason}; the Python wrapper has no such setting "
                                            "(leave it out, or pass ignore_cli_only=True to skip it with a warning)")
            skipped.append(key)
            continue
        try:
            values[key] = _convert(kind, value, is_list)
        except _Bad as e:
            raise _core.InvalidArgument(f"{where}key '{key}': expected {_expected(kind)}, got {e}") from None
        if key == "mode":
            if values[key] not in ("img2img", "txt2img"):
                raise _core.InvalidArgument(f"{where}key 'mode': expected img2img or txt2img (or stream's auto, "
                                            f"live, lossless), got {value!r}")
            mode = values.pop(key)
    if skipped:
        warnings.warn(f"{settings.file}: skipped CLI-only key(s) with no meaning for the Python wrapper: "
                      + ", ".join(skipped), stacklevel=_stacklevel)
    return _map(values, settings, mode, skipped)


def _map(v: Dict[str, Any], settings: Settings, mode: Optional[str], skipped: List[str]) -> Dict[str, Any]:
    init: Dict[str, Any] = {}
    prepare: Dict[str, Any] = {}
    after: Dict[str, Any] = {}
    same = ("t_index_list", "cfg_type", "seed", "frame_buffer_size", "threads", "device", "config", "tokenizer",
            "prediction_type", "lcm_guidance", "clip_skip", "strict_lora", "ip_adapter", "ip_adapter_scale",
            "controlnet_every", "seed_list", "transition", "prompt_blend", "latent_feedback", "deep_cache_every",
            "deep_cache_similarity", "dtype", "variant")
    for k in same:
        if k in v:
            init[k] = v[k]
    if "text_encoder_clip_skip" in v:
        init["clip_skip"] = v["text_encoder_clip_skip"]
    if "model" in v:
        init["model_id_or_path"] = v["model"]
    if "size" in v:
        init["width"], init["height"] = v["size"]
    if "no_denoising_batch" in v:
        init["use_denoising_batch"] = not v["no_denoising_batch"]
    if "no_add_noise" in v:
        init["do_add_noise"] = not v["no_add_noise"]
    if "no_cuda_graphs" in v:
        init["cuda_graphs"] = not v["no_cuda_graphs"]
    if "similarity_filter" in v:
        init["enable_similar_image_filter"] = v["similarity_filter"] > 0
        if v["similarity_filter"] > 0:
            init["similar_image_filter_threshold"] = v["similarity_filter"]
    if "max_skip_frame" in v:
        init["similar_image_filter_max_skip_frame"] = v["max_skip_frame"]
    # VAE / TAESD: the CLI's --taesd DIR|FILE|none and --vae DIR|FILE (which implies --taesd none).
    taesd, vae = v.get("taesd"), v.get("vae")
    if taesd is not None and taesd != "none" and vae is not None:
        raise _core.InvalidArgument(f"{settings.where('vae')}key 'vae': the wrapper takes a TAESD or a VAE (vae_id), "
                                    "not both: leave out taesd, or vae")
    if taesd == "none" or vae is not None:
        init["use_tiny_vae"] = False
        if vae is not None:
            init["vae_id"] = vae
    elif taesd is not None:
        init["use_tiny_vae"] = True
        init["vae_id"] = taesd
    # LoRAs: as the CLI, an LCM-LoRA only when lcm_lora names one (the wrapper alone looks in the hub cache).
    init["use_lcm_lora"] = "lcm_lora" in v
    if "lcm_lora" in v:
        init["lcm_lora_id"] = v["lcm_lora"]
    if "lora" in v:
        init["lora_dict"] = dict(_spec_with_scale(s) for s in v["lora"])
    if "controlnet" in v:
        init["controlnets"] = [_spec_with_scale(s) for s in v["controlnet"]]
    ranges = [k for k in ("control_guidance_start", "control_guidance_end") if k in v]
    if ranges:
        # As the CLI: once for all ControlNets or once each; the range itself is checked by the engine.
        nets = init.get("controlnets")
        if not nets:
            raise _core.InvalidArgument(f"{settings.where(ranges[0])}key '{ranges[0]}': needs controlnet")
        per_net = []
        for k, default in (("control_guidance_start", 0.0), ("control_guidance_end", 1.0)):
            values = v.get(k, [default])
            if len(values) not in (1, len(nets)):
                raise _core.InvalidArgument(f"{settings.where(k)}key '{k}': given {len(values)} times for "
                                            f"{len(nets)} controlnet: give it once (for all) or once each")
            per_net.append(values * len(nets) if len(values) == 1 else values)
        init["controlnets"] = [tuple(n) + (a, b) for n, a, b in zip(nets, per_net[0], per_net[1])]
    if "control_preprocessor" in v:
        pre = v["control_preprocessor"]
        if len(pre) != 1:
            raise _core.InvalidArgument(f"{settings.where('control_preprocessor')}key 'control_preprocessor': the "
                                        f"wrapper takes one preprocessor for all ControlNets, got {len(pre)}")
        init["control_preprocessor"] = pre[0]
    for k in ("image_prompt", "control_input"):
        if k in v:
            after[k] = v[k]
    for k, name in (("prompt", "prompt"), ("negative_prompt", "negative_prompt"),
                    ("num_inference_steps", "num_inference_steps"), ("guidance", "guidance_scale"),
                    ("delta", "delta")):
        if k in v:
            prepare[name] = v[k]
    if "prompt_list" in v:
        prepare["prompt"] = _core.parse_prompt_list(v["prompt_list"])  # as the CLI: the list wins over prompt
    if mode is None and settings.command == "txt2img":
        mode = "txt2img"
    return {"init": init, "prepare": prepare, "after": after, "mode": mode, "skipped": skipped}


def from_config(cls: Any, path: Any, *, mode: Optional[str] = None, ignore_cli_only: bool = False,
                **overrides: Any) -> Any:
    """StreamDiffusionWrapper.from_config (see there)."""
    import inspect

    settings = load_settings(path)
    args = wrapper_arguments(settings, ignore_cli_only=ignore_cli_only, _stacklevel=4)  # the caller of from_config
    init, prepare, after = args["init"], args["prepare"], args["after"]
    init_names = set(inspect.signature(cls.__init__).parameters) - {"self"}
    prepare_names = {"prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "delta"}
    for name, value in overrides.items():
        if name in ("image_prompt", "control_input"):
            after[name] = value
        elif name in init_names:
            init[name] = value
        elif name in prepare_names:
            prepare[name] = value
        elif settings_key(name) in _TYPES:  # a settings key (e.g. size="64x64", guidance=1.3), read as in a file
            key = settings_key(name)
            one = Settings(f"{settings.file} (override {name}=)")
            one[key] = _as_text(value)[0]
            sub = wrapper_arguments(one)
            init.update({k: val for k, val in sub["init"].items() if k != "use_lcm_lora" or key == "lcm_lora"})
            prepare.update(sub["prepare"])
            after.update(sub["after"])
            if sub["mode"]:
                mode = mode or sub["mode"]
        else:
            close = difflib.get_close_matches(name, sorted(init_names | prepare_names | set(_TYPES)), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise _core.InvalidArgument(f"from_config: unknown keyword argument '{name}'{hint}")
    init["mode"] = mode or args["mode"] or "img2img"
    if after.get("control_input") is not None and init.get("control_preprocessor") is not None:
        after["control_preprocessor"] = init.pop("control_preprocessor")  # applied once to the control image
    if prepare.get("num_inference_steps") is not None and init.get("t_index_list") is None:
        # As the CLI: the default t_index_list is the one for these inference steps (the wrapper's own default is
        # resolved for the model's steps, before prepare() sets them).
        from .wrapper import resolve_model_path

        init["t_index_list"] = list(_core.resolve_config(
            resolve_model_path(init.get("model_id_or_path")), init["mode"],
            num_inference_steps=int(prepare["num_inference_steps"]), config=init.get("config") or "",
            prediction_type=init.get("prediction_type") or "").t_index_list)
    wrapper = cls(**init)
    if prepare:
        # The file's steps / guidance / delta become the wrapper's defaults: a later prepare(prompt) keeps them.
        steps, guidance, delta = wrapper._recommended
        wrapper._recommended = (
            int(prepare["num_inference_steps"]) if prepare.get("num_inference_steps") is not None else steps,
            float(prepare["guidance_scale"]) if prepare.get("guidance_scale") is not None else guidance,
            float(prepare["delta"]) if prepare.get("delta") is not None else delta)
        wrapper.prepare(prepare.pop("prompt", ""), prepare.pop("negative_prompt", ""), **prepare)
    if after.get("image_prompt") is not None:
        wrapper.set_image_prompt(after["image_prompt"])
    if after.get("control_input") is not None:
        if not wrapper.controlnets:
            raise _core.InvalidArgument(f"{settings.where('control_input')}key 'control_input': needs controlnet")
        from .wrapper import _picture_u8

        image = _picture_u8(after["control_input"])
        if after.get("control_preprocessor") is not None:
            import numpy as np

            image = np.asarray(_core.control_preprocess(after["control_preprocessor"], np.asarray(image)))
        for i in range(len(wrapper.controlnets)):
            wrapper.set_control_image(i, image)
    wrapper.settings_file = settings.file
    return wrapper
