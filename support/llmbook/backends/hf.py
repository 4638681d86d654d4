"""The reference: Hugging Face transformers' LlamaForCausalLM in fp32, with its DynamicCache."""
import numpy as np
import torch
from transformers import DynamicCache

from . import StepBackend, check_tokens, step_weight_bytes


class HFBackend(StepBackend):
    name = "hf"

    def __init__(self, bundle):
        self.model = bundle.hf_model
        cfg = bundle.config
        self.vocab_size = cfg.vocab_size
        self.max_context = cfg.max_position_embeddings
        # parameters() yields a tied table once
        self.weight_bytes = step_weight_bytes(
            sum(p.nbytes for p in self.model.parameters()),
            self.model.get_input_embeddings().weight.nbytes, cfg.vocab_size, cfg.tie_word_embeddings)
        self.reset()

    def _reset(self):
        self.cache = DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def _forward(self, ids: list[int]) -> np.ndarray:
        # the head for the last position only (logits_to_keep=1): what generation needs, and what
        # every other engine's prefill computes (at 256 tokens the other 255 rows cost ~75 ms)
        out = self.model(input_ids=torch.tensor([ids]), past_key_values=self.cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[0, -1].float().numpy()

    @torch.inference_mode()
    def _verify(self, ids: list[int]) -> np.ndarray:
        """Several new tokens in one forward pass over the cache; every one's logits
        (chapter 12)."""
        out = self.model(input_ids=torch.tensor([ids]), past_key_values=self.cache, use_cache=True)
        return out.logits[0].float().numpy()

    def _rollback(self, n: int) -> None:
        self.cache.crop(-n)  # transformers 5: a negative count removes that many

    @torch.inference_mode()
    def text_logits(self, ids) -> np.ndarray:
        """Logits [len(ids), vocab] of every position from one forward pass over `ids` (a new
        sequence): the teacher-forced reference (llmbook.quality) without a decode step per token."""
        ids = check_tokens(ids, self.vocab_size, 0, self.max_context, self.name)
        self.reset()
        out = self.model(input_ids=torch.tensor([ids]), past_key_values=self.cache, use_cache=True)
        self.length = len(ids)
        return out.logits[0].float().numpy()
