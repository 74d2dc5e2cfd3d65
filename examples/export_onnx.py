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
# Data-free calibration, so round-to-nearest weights (GPTQ wants text calibration).
nearest = fptq.CompileConfig(weights=fptq.WeightConfig(rounding=fptq.WeightRounding.NEAREST))
compiled = fptq.compile(loaded, fptq.RandomTokens(), nearest, num_samples=16, seq_len=256)
exported = export_folder(
    compiled, loaded.tokenizer, out, OnnxLayout.ORT, overwrite=True, model_config=loaded.model.config
)
print(f"{exported.path}: {exported.file_bytes / 1e6:.1f} MB, {exported.int4_initializers} int4 weights")

session = OrtCausalLM.load(out)  # plain onnxruntime; the folder also loads in onnxruntime-genai
for prompt, temperature in (("The capital of France is", 0.0), ("Once upon a time", 0.8)):
    print(prompt + fptq.generate_text(session, loaded.tokenizer, prompt, max_new_tokens=24, temperature=temperature))
