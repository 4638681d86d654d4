"""transformers' LlamaForCausalLM with every decoder layer swapped for the fused operation of
chapter 5 (static KV cache, stacked projections, compiled decode step)."""
import numpy as np
import torch

from ..fused_llama.swap import swap_in
from . import StepBackend, step_weight_bytes


class TorchFusedBackend(StepBackend):
    name = "torch-fused"

    def __init__(self, bundle, max_len: int = 1024, compile: bool = True):
        self.vocab_size = bundle.config.vocab_size
        self.max_context = min(max_len, bundle.config.max_position_embeddings)
        self.model = swap_in(bundle.hf_model, self.max_context, compile=compile)
        # what its forward reads: each layer's stacked matrices and norms, the embedding table,
        # the final norm and the head (the table itself when tied: one tensor, counted once)
        inner = self.model.model
        tensors = [t for layer in inner.layers for t in layer.w]
        tensors += [inner.embed_tokens.weight, inner.norm.weight, self.model.lm_head.weight]
        held = sum({t.data_ptr(): t.nbytes for t in tensors}.values())
        self.weight_bytes = step_weight_bytes(held, inner.embed_tokens.weight.nbytes,
                                              self.vocab_size, bundle.config.tie_word_embeddings)
        self.reset()

    def _reset(self):
        pass  # rows left from an earlier sequence stay in the cache; the mask never lets a token see them

    @torch.inference_mode()
    def _forward(self, ids: list[int]) -> np.ndarray:
        # the new tokens' positions follow the cached ones (StepBackend counts them)
        pos = torch.arange(self.length, self.length + len(ids))[None]
        out = self.model(input_ids=torch.tensor([ids]), position_ids=pos, use_cache=False, logits_to_keep=1)
        return out.logits[0, -1].float().numpy()
