"""Compile → export ONNX → generate, in a few lines.

python examples/export_onnx.py [OUT_DIR]
"""

from __future__ import annotations

import sys

import fptq_compile as fptq
from fptq_compile.exporters import OnnxLayout, export_folder
from fptq_compile.runtime import OrtCausalLM

out = sys.argv[1] if len(sys.argv) > 1 else "smollm2-w4a8-onnx"
loaded = fptq.load_model()
# Data-free calibration, so round-to-nearest weights (GPTQ wants text calibration); lm_head
# int8 weight-only: decoding no longer reads its 113 MB of fp32 per token, and, tied to the
# embedding, it costs no file size (ONNX Runtime computes its codes from the table at load).
config = fptq.CompileConfig(
    weights=fptq.WeightConfig(rounding=fptq.WeightRounding.NEAREST), int8_weight_only=("lm_head",)
)
compiled = fptq.compile(loaded, fptq.RandomTokens(), config, num_samples=16, seq_len=256)
exported = export_folder(
    compiled, loaded.tokenizer, out, OnnxLayout.ORT, overwrite=True, model_config=loaded.model.config
)
print(f"{exported.path}: {exported.file_bytes / 1e6:.1f} MB, {exported.int4_initializers} int4 weights")

# exact=False: ORT's default accuracy level 4 (int8 activations inside its int4/int8 MatMuls),
# the fast path; exact=True gives the torch reference's numbers. The folder also loads in
# onnxruntime-genai.
session = OrtCausalLM.load(out, exact=False)
for prompt, temperature in (("The capital of France is", 0.0), ("Once upon a time", 0.8)):
    print(prompt + fptq.generate_text(session, loaded.tokenizer, prompt, max_new_tokens=24, temperature=temperature))
