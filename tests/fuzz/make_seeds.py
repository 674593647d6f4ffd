#!/usr/bin/env python3
"""Writes the hand-made seed inputs of tests/fuzz/corpus/<target>/ (committed; small). Run from tests/fuzz with
Debian's python3 (python3-pil). scripts/fuzz.sh adds seeds made from the fixtures at run time."""
import base64, io, json, os, struct
from PIL import Image

C = "corpus"


def put(t, name, data):
    os.makedirs(os.path.join(C, t), exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(C, t, name), "wb") as f:
        f.write(data)


def img(fmt, w, h, mode="RGB", **kw):
    im = Image.new(mode, (w, h))
    for x in range(w):
        for y in range(h):
            im.putpixel((x, y), (x * 16 % 256, y * 16 % 256, 128) if mode == "RGB" else (x * 16) % 256)
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


jpg, png, gray = img("JPEG", 16, 16, quality=50), img("PNG", 16, 8), img("PNG", 8, 8, "L")
prog = img("JPEG", 24, 16, progressive=True)
# image: the first byte picks the path (bit 0 base64, bit 1 PNG allowed, bits 2-3 the target size).
put("image", "jpeg", b"\x00" + jpg)
put("image", "png", b"\x02" + png)
put("image", "gray_png", b"\x06" + gray)
put("image", "progressive", b"\x0a" + prog)
put("image", "b64_jpeg", b"\x01" + base64.b64encode(jpg))
put("image", "dataurl_png", b"\x03data:image/png;base64," + base64.b64encode(png))
b64j = "data:image/jpeg;base64," + base64.b64encode(jpg).decode()
b64p = base64.b64encode(png).decode()
ws = {
    "config_full": {"type": "config", "mode": "img2img", "prompt": "a cat", "negative_prompt": "blurry",
                    "guidance": 1.5, "delta": 0.8, "t_index_list": [20, 35], "seed": 7, "similarity_filter": 0.9,
                    "lora": {"lcm": 0.5, "style": -1},
                    "controlnets": [{"scale": 0.5, "preprocessor": "canny:50:150", "guidance_start": 0.25},
                                    {"scale": 0, "preprocessor": "feedback", "guidance_start": 0, "guidance_end": 0.5}],
                    "ip_adapter_scale": 0.6},
    "config_steps": {"type": "config", "mode": "txt2img", "steps": 4},
    "config_images": {"type": "config", "control_image": b64j, "image_prompt": b64p},
    "config_null": {"type": "config", "control_image": None, "image_prompt": None},
    "ping": {"type": "ping"}, "stats": {"type": "stats"}, "generate": {"type": "generate"},
}
for k, v in ws.items():
    put("ws_message", k, json.dumps(v))
# Nesting around the 64-level limit (core/json_limits.h): 63 levels under the message object, and 70.
put("ws_message", "nested_63", '{"type": "config", "guidance": ' + "[" * 63 + "]" * 63 + "}")
put("ws_message", "nested_70", '{"type": "config", "guidance": ' + "[" * 70 + "]" * 70 + "}")
# api_body: the first byte picks the endpoint (bit 0: txt2img).
api = {
    "txt2img": (1, {"prompt": "a dog", "width": 128, "height": 64, "seed": 3, "steps": 2,
                    "controlnets": [{"scale": 0}, {"preprocessor": "feedback"}]}),
    "txt2img_control": (1, {"prompt": "x", "control_image": b64j, "guidance": 2, "t_index_list": [0, 10]}),
    "img2img": (0, {"prompt": "a dog", "image": b64j, "width": 64.0,
                    "controlnets": [{"scale": 1, "preprocessor": "gray", "guidance_end": 0.75},
                                    {"scale": 1, "preprocessor": "passthrough"}]}),
    "img2img_png": (0, {"image": "data:image/png;base64," + b64p, "lora": {"lcm": 1}, "image_prompt": b64j,
                        "ip_adapter_scale": 1}),
}
for k, (b, v) in api.items():
    put("api_body", k, bytes([b]) + json.dumps(v).encode())
put("api_body", "nested_70", b"\x01" + b'{"width": ' + b"{\"a\": " * 70 + b"1" + b"}" * 70 + b"}")
for i, line in enumerate(["prompt a cat in the snow", "negative blurry", "guidance 1.5", "delta 0.5",
                          "t_index_list 32,45", "seed 42", "filter on", "filter_threshold 0.98", "lora lcm 0.8",
                          "ip_adapter_scale 0.5", "image_prompt none", "controlnet_scale 1 0.5",
                          "control_preprocessor 0 canny:50:150", "deep_cache 3 0.9", "stats", "quit", "help",
                          "# comment", ""]):
    put("control_command", "c%02d" % i, line)
prompts = ["a photo of a cat", "A &amp; B &lt;3 &#128512; &notin", "ΣΑΣ ὈΔΥΣΣΕΎΣ İstanbul",
           "emoji 😀👍🏽 and 中文 and ﬁ", "   many    spaces\t\n ", "don't it's we'll 123456 3.14", "a" * 300]
for i, p in enumerate(prompts):
    put("tokenizer", "p%d" % i, p.encode("utf-8"))
put("tokenizer", "bad_utf8", b"bad utf-8 \xff\xfe \xc0\xaf \xed\xa0\x80 \xf4\x90\x80\x80 end")
put("recommendations", "full", json.dumps({
    "size": "512x512", "num_inference_steps": 50,
    "txt2img": {"t_index_list": [0], "cfg_type": "none", "guidance": 0},
    "img2img": {"t_index_list": [32, 45], "cfg_type": "self", "guidance": 1.2, "delta": 1.0}, "note": "sd-turbo"}))
put("recommendations", "emoji", json.dumps({
    "size": "64x64", "num_inference_steps": 50, "cpu_dtype": "fp32", "cpu_threads": 1,
    "txt2img": {"t_index_list": [0, 16, 32, 45], "cfg_type": "none"},
    "img2img": {"t_index_list": [32, 45], "cfg_type": "self", "guidance": 1.4, "delta": 0.8}, "note": "emoji"}))

SIZES = {"F32": 4, "F16": 2, "I64": 8, "U8": 1, "BF16": 2, "BOOL": 1}


def st(tensors, meta=None, align=True):
    hdr, data, off = {}, b"", 0
    if meta:
        hdr["__metadata__"] = meta
    for name, (dt, shape, payload) in tensors.items():
        n = SIZES[dt]
        for s in shape:
            n *= s
        hdr[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + n]}
        data += payload[:n].ljust(n, b"\0")
        off += n
    j = json.dumps(hdr).encode()
    if align:
        j += b" " * (-(8 + len(j)) % 8)
    return j, data


def file(t):
    j, d = t
    return struct.pack("<Q", len(j)) + j + d


one = struct.pack("<f", 1.0)
f1 = st({"a.weight": ("F32", [2, 3], one * 6), "b": ("F16", [3], b"\x00\x3c" * 3), "c": ("I64", [], b"\x01")},
        {"format": "pt"})
put("safetensors", "small", file(f1))
put("safetensors_file", "small", file(f1))
put("safetensors_file", "unaligned",
    file(st({"x": ("U8", [3], b"abc"), "y": ("F32", [2], one * 2), "z": ("BF16", [0, 4], b"")}, align=False)))
# lora / single_file: fuzz_util.h FileImage inputs (header JSON, NUL, data bytes).
lora = st({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": ("F32", [4, 32], one * 128),
           "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": ("F32", [32, 4], one * 128),
           "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ("F16", [], b"\x00\x44"),
           "unet.mid_block.attentions.0.to_q.lora.down.weight": ("F16", [2, 8, 1, 1], b""),
           "unet.mid_block.attentions.0.to_q.lora.up.weight": ("F16", [8, 2, 1, 1], b""),
           "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": ("F32", [2, 8], one * 16),
           "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": ("F32", [8, 2], one * 16),
           "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": ("I64", [], b"\x04")})
put("lora", "mixed", lora[0].rstrip(b" ") + b"\0" + lora[1])
# ip_adapter: a Plus and a full-face file for tiny-sd15's UNet (fuzz_ip_adapter.cpp; the plain one comes from the
# fixtures), zero data (the target pads it).
ip_branches = {}
for k, w in ((1, 32), (3, 32), (5, 32), (7, 64)):  # the down, up and mid blocks' attn2, in key order
    for n in ("to_k_ip", "to_v_ip"):
        ip_branches["ip_adapter.%d.%s.weight" % (k, n)] = ("F32", [w, 32], b"")
plus = {"image_proj.latents": ("F32", [1, 4, 24], b""), "image_proj.proj_in.weight": ("F32", [24, 16], b""),
        "image_proj.proj_in.bias": ("F32", [24], b""), "image_proj.proj_out.weight": ("F32", [32, 24], b""),
        "image_proj.proj_out.bias": ("F32", [32], b""), "image_proj.norm_out.weight": ("F32", [32], b""),
        "image_proj.norm_out.bias": ("F32", [32], b"")}
for n in ("0.norm1.", "0.norm2.", "1.0."):
    plus["image_proj.layers.0." + n + "weight"] = ("F32", [24], b"")
    plus["image_proj.layers.0." + n + "bias"] = ("F32", [24], b"")
plus.update({"image_proj.layers.0.0.to_q.weight": ("F32", [64, 24], b""),
             "image_proj.layers.0.0.to_kv.weight": ("F32", [128, 24], b""),
             "image_proj.layers.0.0.to_out.weight": ("F32", [24, 64], b""),
             "image_proj.layers.0.1.1.weight": ("F32", [96, 24], b""),
             "image_proj.layers.0.1.3.weight": ("F32", [24, 96], b"")}, **ip_branches)
plus_st = st(plus)
put("ip_adapter", "plus", plus_st[0].rstrip(b" ") + b"\0")
face = {"image_proj.proj.0.weight": ("F32", [16, 16], b""), "image_proj.proj.0.bias": ("F32", [16], b""),
        "image_proj.proj.2.weight": ("F32", [32, 16], b""), "image_proj.proj.2.bias": ("F32", [32], b""),
        "image_proj.proj.3.weight": ("F32", [32], b""), "image_proj.proj.3.bias": ("F32", [32], b"")}
face.update(ip_branches)
put("ip_adapter", "full_face", st(face)[0].rstrip(b" ") + b"\0")
sf = st({"model.diffusion_model.input_blocks.0.0.weight": ("F16", [32, 4, 3, 3], b""),
         "model.diffusion_model.out.2.weight": ("F16", [4, 32, 3, 3], b""),
         "first_stage_model.encoder.conv_in.weight": ("F16", [32, 3, 3, 3], b""),
         "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": ("F16", [1000, 32], b""),
         "0.weight": ("F32", [64, 3, 3, 3], b""), "1.conv.0.weight": ("F32", [64, 64, 3, 3], b"")})
put("single_file", "ldm_like", sf[0].rstrip(b" ") + b"\0")
# config: the first byte picks the component (see fuzz_config.cpp).
cfgs = {6: {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "original_inference_steps": 50, "prediction_type": "epsilon"},
        7: {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "LCMScheduler"],
            "safety_checker": [None, None]},
        4: {"text_config": {"hidden_size": 32, "num_attention_heads": 4,
                            "architectures": ["CLIPTextModelWithProjection"], "projection_dim": 32}},
        5: {"vision_config": {"hidden_size": 32, "image_size": 32, "patch_size": 8}, "projection_dim": 16}}
for k, v in cfgs.items():
    put("config", "k%d" % k, bytes([k]) + json.dumps(v).encode())
# settings: YAML settings files (fuzz_settings.cpp's command has these options).
put("settings", "full", "# live.yaml\ninput: camera\nprompt: \"oil painting of a harbour\"\nguidance: 1.2\n"
    "t_index_list: \"32,45\"\nlora: [style.safetensors:0.8, detail.safetensors]\nloop: true\nframes: 100\n"
    "seed: 18446744073709551615\nqueue: 8\nprediction-type: v_prediction\ncontrolnet-scale: [0.5, 1]\n")
put("settings", "block_list", "input: in.mp4\ncontrol:\n  - canny\n  - depth\nno_denoising_batch: false\n"
    "text-encoder-clip-skip: 2\nlcm-guidance: 8.5\nthreads: 2\n")
put("settings", "flow", "{input: x, prompt: 'a ''quoted'' cat', loop: yes, frames: -1}\n")
put("settings", "anchors", "input: &a camera\nprompt: *a\n---\nsecond: doc\n")
put("settings", "tags", "input: !!str 12\nframes: !!int 0x10\nguidance: .inf\n")
# osc: OSC datagrams (messages and bundles).
def osc_str(s):
    b = s.encode() + b"\0"
    return b + b"\0" * (-len(b) % 4)
def osc(addr, *args):
    tags, data = ",", b""
    for a in args:
        if isinstance(a, bool): tags += "T" if a else "F"
        elif isinstance(a, int): tags += "i"; data += struct.pack(">i", a)
        elif isinstance(a, float): tags += "f"; data += struct.pack(">f", a)
        elif a is None: tags += "N"
        else: tags += "s"; data += osc_str(a)
    return osc_str(addr) + osc_str(tags) + data
def bundle(*msgs):
    out = osc_str("#bundle") + b"\0" * 7 + b"\1"
    for m in msgs: out += struct.pack(">i", len(m)) + m
    return out
put("osc", "prompt", osc("/prompt", "a watercolour fox"))
put("osc", "guidance", osc("/streamdiffusion/guidance", 1.4))
put("osc", "t_index", osc("/t_index_list", 20, 35))
put("osc", "seed_float", osc("/seed", 42.0))
put("osc", "lora", osc("/lora", "style", 0.7))
put("osc", "filter", osc("/filter", True))
put("osc", "image_prompt", osc("/image_prompt", None))
put("osc", "reply", osc("/reply", "127.0.0.1", 9001))
put("osc", "bundle", bundle(osc("/delta", 0.5), bundle(osc("/stats"), osc("/negative", "blurry"))))

# weight_names: the input is both a weight-file name and a shard index's text.
for i, n in enumerate(["diffusion_pytorch_model.safetensors", "model.fp16.safetensors",
                       "diffusion_pytorch_model.safetensors.index.fp16.json",
                       "diffusion_pytorch_model.safetensors.fp16.index.json",
                       "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
                       "diffusion_pytorch_model-00002-of-00002.fp16.safetensors", "model.ckpt"]):
    put("weight_names", "name%d" % i, n)
put("weight_names", "index", json.dumps({"metadata": {"total_size": 48}, "weight_map": {
    "x": "a-00001-of-00002.safetensors", "y": "a-00002-of-00002.safetensors"}}))
