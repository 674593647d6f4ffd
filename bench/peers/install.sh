#!/usr/bin/env bash
# Install one peer into its own virtual environment OUTSIDE the repository, from PyPI (idempotent: a venv whose
# install finished is reused as it is; delete it to reinstall).
#   bench/peers/install.sh streamdiffusion|diffusers|openvino|sdcpp|report
# Venvs live in $SD_PEERS_VENVS (default ~/.cache/streamdiffusion-bench/venvs/<peer>). Every venv sees Debian's CPU
# torch 1.13 (python3-torch) through --system-site-packages of /usr/bin/python3: PyPI's torch wheel for Linux would
# pull gigabytes of CUDA packages, so nothing here may install torch (hence --no-deps where a package requires it).
set -euo pipefail
peer=${1:?usage: install.sh streamdiffusion|diffusers|openvino|sdcpp|report}
root=${SD_PEERS_VENVS:-$HOME/.cache/streamdiffusion-bench/venvs}
venv=$root/$peer
[[ -f $venv/.installed ]] && exit 0
mkdir -p "$root"
[[ -x $venv/bin/python ]] || /usr/bin/python3 -m venv --system-site-packages "$venv"
pip() { "$venv/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
echo "install.sh: installing peer '$peer' into $venv" >&2

case $peer in
  streamdiffusion)
    # The original StreamDiffusion (Dec 2023) and the diffusers it pins; transformers / accelerate / huggingface_hub
    # of the same weeks (diffusers 0.24 imports huggingface_hub.cached_download, gone in hub 0.26).
    pip --no-deps streamdiffusion==0.1.1 diffusers==0.24.0
    pip --no-deps transformers==4.35.2 accelerate==0.25.0 huggingface_hub==0.19.4 tokenizers==0.15.0 \
      safetensors==0.4.1 regex fire omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 importlib_metadata zipp \
      tqdm filelock fsspec packaging pyyaml psutil requests
    ;;
  diffusers)
    # The newest diffusers whose AutoPipeline runs on torch 1.13 (0.30+ imports PAG processors that need torch 2,
    # 0.33+ torch.float8_e4m3fn, 0.42 torch.accelerator) and the transformers of the same time (5.x needs torch 2).
    pip --no-deps "diffusers==${SD_PEERS_DIFFUSERS_VERSION:-0.29.2}" transformers==4.46.3 tokenizers==0.20.3 \
      huggingface_hub==0.30.2 accelerate==1.1.1 safetensors==0.4.5 regex importlib_metadata zipp tqdm filelock \
      fsspec packaging pyyaml psutil requests
    ;;
  openvino)
    # FastSD CPU's stack (optimum-intel's OVStableDiffusionPipeline) at the last versions that accept torch 1.x.
    pip --no-deps "openvino==${SD_PEERS_OPENVINO_VERSION:-2024.4.0}" openvino-telemetry==2024.1.0 \
      optimum-intel==1.19.0 optimum==1.22.0 diffusers==0.29.2 transformers==4.44.2 tokenizers==0.19.1 \
      huggingface_hub==0.30.2 safetensors==0.4.5 regex importlib_metadata zipp tqdm filelock fsspec packaging \
      pyyaml psutil requests onnx==1.16.2 protobuf==3.20.3 sympy mpmath coloredlogs humanfriendly
    ;;
  sdcpp)
    # Built from source with CMake (the sdist vendors stable-diffusion.cpp and ggml): one core, low priority.
    export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-1}
    nice -n 19 "$venv/bin/python" -m pip install --disable-pip-version-check -v --no-binary stable-diffusion-cpp-python \
      "stable-diffusion-cpp-python==${SD_PEERS_SDCPP_VERSION:-0.4.7}" > "$venv/build.log" 2>&1 ||
      { tail -30 "$venv/build.log" >&2; exit 1; }
    ;;
  report)
    pip matplotlib
    ;;
  *) echo "install.sh: unknown peer '$peer'" >&2; exit 2 ;;
esac
touch "$venv/.installed"
