"""Exporters: lower a compiled model to runtime formats."""

from __future__ import annotations

from fptq_compile.exporters.onnx_folder import export_folder
from fptq_compile.exporters.onnx_qdq import OnnxExport, OnnxLayout, export_onnx

__all__ = ["OnnxExport", "OnnxLayout", "export_folder", "export_onnx"]
