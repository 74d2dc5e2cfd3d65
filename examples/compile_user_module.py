"""Compile your own module, and a program you already exported, to W4A8.

Any ``nn.Module`` compiles with its own inputs: calibration is a list of batches (each a
tensor, a tuple of positional inputs or a dict of keyword inputs), the first one doubles
as the example input. The module here has dict inputs, a dict output and a norm written
in plain torch ops (which the LAE fold recognises from the graph); the plan says how each
activation group is quantized and why, and which linears stay float. The same happens
for a ``torch.export.ExportedProgram`` (or its ``.module()``).

    python examples/compile_user_module.py [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn

import fptq_compile as fptq
from fptq_compile.exporters import OnnxLayout, export_onnx


class ScaledRMSNorm(nn.Module):
    """A hand-written RMSNorm with an offset gain (``1 + w``, as Gemma's)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.weight)


class Block(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.norm = ScaledRMSNorm(size)
        self.up = nn.Linear(size, 4 * size)
        self.down = nn.Linear(4 * size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class Tagger(nn.Module):
    """Token features in, per-token tag scores out."""

    def __init__(self, size: int = 128, tags: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(size) for _ in range(3)])
        self.tags = nn.Linear(size, tags)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        x = features * mask.unsqueeze(-1)
        for block in self.blocks:
            x = block(x)
        return {"tag_scores": self.tags(x)}


def batch(seed: int, size: int = 4, length: int = 32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # A few loud channels, as real activations have: what LAE flattens.
    features = torch.randn(size, length, 128, generator=generator) * (1 + 20 * (torch.arange(128) < 4))
    return {"features": features, "mask": torch.ones(size, length)}


def main(out_dir: Path) -> None:
    torch.manual_seed(0)
    model = Tagger().eval()
    calibration = [batch(seed) for seed in range(8)]
    # The output head stays float by default (include = linears in numbered blocks).
    config = fptq.CompileConfig(weights=fptq.WeightConfig(group_size=64))

    compiled = fptq.compile(model, calibration, config, progress=False)
    for group in compiled.plan.groups:
        print(f"{group.input_node:>12}  {group.activation.kind.value:<10}  {group.reason}")
    for skipped in compiled.plan.skipped:
        print(f"{skipped.module_path:>12}  kept float: {skipped.reason}")

    test = batch(100, size=2, length=20)  # another batch size and length
    with torch.no_grad():
        float_scores, w4a8_scores = model(**test)["tag_scores"], compiled(**test)["tag_scores"]
    agreement = (float_scores.argmax(-1) == w4a8_scores.argmax(-1)).float().mean()
    print(f"W4A8 picks the float model's tag for {agreement:.0%} of tokens")

    # An already exported program compiles the same way.
    program = torch.export.export(model, (), calibration[0], strict=False)
    from_program = fptq.compile(program, calibration, config, progress=False)
    print("plan from the exported program:", from_program.plan.summary()["linears_per_activation_class"])

    out_dir.mkdir(parents=True, exist_ok=True)
    export_onnx(compiled, out_dir / "tagger.onnx", OnnxLayout.QDQ)
    session = ort.InferenceSession(str(out_dir / "tagger.onnx"), providers=["CPUExecutionProvider"])
    (onnx_scores,) = session.run(None, {name: value.numpy() for name, value in test.items()})
    difference = float((torch.from_numpy(onnx_scores) - w4a8_scores).abs().max())
    print(f"ONNX Runtime vs the compiled torch graph: max |difference| {difference:.2e}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("fptq-user-module"))
