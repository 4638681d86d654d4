"""SmolLM2 (any Llama-family checkpoint) exported to LiteRT (.tflite) with litert-torch.

compat.py   import litert-torch's Generative API without TensorFlow (the workaround, in one place)
model.py    re-authoring: ModelConfig from our LlamaConfig, checkpoint mapping with TensorNames
convert.py  one .tflite with prefill and decode signatures, fp32 or int8 dynamic
runner.py   the LiteRT interpreter with signature runners, the KV cache fed back
build.py    converted files cached on disk; conversion runs in a subprocess (time, peak memory)
"""
