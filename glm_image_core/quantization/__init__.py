"""Quantization: GGUF files, ggml block formats and the quantized layers."""
