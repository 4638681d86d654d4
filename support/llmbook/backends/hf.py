"""The reference: Hugging Face transformers' LlamaForCausalLM in fp32, with its DynamicCache."""
import numpy as np
import torch
from transformers import DynamicCache

from . import StepBackend


class HFBackend(StepBackend):
    name = "hf"

    def __init__(self, bundle):
        self.model = bundle.hf_model
        self.vocab_size = bundle.config.vocab_size
        self.max_context = bundle.config.max_position_embeddings
        self.reset()

    def _reset(self):
        self.cache = DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def _forward(self, ids: list[int]) -> np.ndarray:
        out = self.model(input_ids=torch.tensor([ids]), past_key_values=self.cache, use_cache=True)
        return out.logits[0, -1].float().numpy()
