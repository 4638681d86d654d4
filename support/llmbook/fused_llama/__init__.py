"""SmolLM2 (any Llama-family checkpoint) with each transformers decoder layer swapped for one fused
operation: the accelerated-library pattern of chapter 5.

layer.py   the fused decoder-layer operation and its weight layout
swap.py    a static KV cache and the fused layer standing in transformers' LlamaForCausalLM
"""
