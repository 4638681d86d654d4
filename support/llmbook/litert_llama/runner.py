# Generated from notebooks/07_tflite.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""Running a converted model in the LiteRT interpreter: signature runners, the KV cache
fed back."""

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from llmbook.engine import check_tokens


class LiteRTRunner:
    """One sequence through a .tflite with `prefill` (fixed length) and `decode`
    signatures.

    The interpreter holds no state between calls: the KV cache is ours, a dict of numpy
    arrays (`kv_cache_k_0` ... `kv_cache_v_{L-1}`, each [1, kv_len, kv_heads, head_dim])
    passed in and taken back on every call."""

    def __init__(self, path, num_threads: int, name: str = "litert"):
        self.name = name  # what its errors call it
        self.interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
        self.prefill_runner = self.interpreter.get_signature_runner("prefill")
        self.decode_runner = self.interpreter.get_signature_runner("decode")
        inputs = self.prefill_runner.get_input_details()
        self.prefill_len = int(inputs["tokens"]["shape"][1])
        self.kv_shapes = {
            k: tuple(v["shape"]) for k, v in inputs.items() if k.startswith("kv_cache_")
        }
        self.kv_len = next(iter(self.kv_shapes.values()))[1]
        # the book's generation loop checks prompt + new tokens against it
        self.max_context = self.kv_len
        self.vocab_size = int(
            self.decode_runner.get_output_details()["logits"]["shape"][-1]
        )
        self.reset()

    def reset(self):
        self.kv = {k: np.zeros(s, np.float32) for k, s in self.kv_shapes.items()}
        self.pos = 0

    def _check(self, ids, cached: int):
        return np.asarray(
            check_tokens(ids, self.vocab_size, cached, self.kv_len, self.name), np.int32
        )

    def _run(self, runner, tokens, start):
        n = tokens.shape[1]
        out = runner(
            tokens=tokens,
            input_pos=np.arange(start, start + n, dtype=np.int32),
            **self.kv
        )
        self.kv = {k: out[k] for k in self.kv}  # the updated cache, fed back next call
        return out["logits"][0]

    def forward(self, ids) -> np.ndarray:
        """Append `ids` to the sequence; logits [len(ids), vocab] of every new position.

        Full chunks of prefill_len go through `prefill`, padded with token 0 (the
        padding writes cache rows beyond the sequence that later tokens overwrite and
        the causal mask hides). A chunk that would run past the end of the cache goes
        token by token through `decode`."""
        ids = self._check(ids, self.pos)
        logits, i = [], 0
        while i < ids.size:
            chunk = ids[i : i + self.prefill_len]
            if self.pos + self.prefill_len <= self.kv_len and chunk.size > 1:
                tokens = np.zeros((1, self.prefill_len), np.int32)
                tokens[0, : chunk.size] = chunk
                logits.append(
                    self._run(self.prefill_runner, tokens, self.pos)[: chunk.size]
                )
            else:
                chunk = chunk[:1]
                logits.append(
                    self._run(self.decode_runner, chunk.reshape(1, 1), self.pos)
                )
            self.pos += chunk.size
            i += chunk.size
        return np.concatenate(logits).astype(np.float32)

    def prefill(self, ids) -> np.ndarray:
        self._check(ids, 0)  # before forgetting the sequence
        self.reset()
        return self.forward(ids)[-1]

    def decode(self, token: int) -> np.ndarray:
        return self.forward([token])[-1]
