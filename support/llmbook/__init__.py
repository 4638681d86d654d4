"""Support package of the executable book on LLM inference: loading, engines, comparison, timing.

Modules under mlx_llama/ (and the other engine folders) plus sampling.py are generated from the
chapters' notebooks by `python -m llmbook.export`: the notebooks are their source.
"""
import logging
import warnings

# torchao (pulled in by litert-torch, imported by transformers whenever installed) logs that its
# CUDA-only kernels do not load on a CPU machine, and torch logs a deprecation about torchao's enum
# registration. Both are harmless here, and their timestamps would make chapter outputs vary.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

# tqdm.auto warns at import that ipywidgets is absent; progress bars fall back to text, which is fine.
warnings.filterwarnings("ignore", message="IProgress not found")

__version__ = "0.1.0"
