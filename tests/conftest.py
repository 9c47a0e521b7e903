"""Shared fixtures: tiny random models (HF folders and GGUF files) built with the real libraries."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello world! Small models run on small devices; big models need big memory.",
    "def add(a, b):\n    return a + b\n",
    "KV caches store keys and values so that decoding does not recompute the prompt.",
    "Numbers 0123456789 and café, naïve, 東京.",
]
TINY_VOCAB = 384
TINY: dict[str, Any] = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=0,
    eos_token_id=2,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Converted model files go to a cache of the test session's own (subprocesses inherit it),
    never to the user's."""
    import os

    folder = tmp_path_factory.mktemp("model-cache")
    os.environ["INFOPT_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="module")
def module_dir(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Path]:
    """A folder for one test module's bundles, removed when the module is done: the real-model
    bundles take gigabytes, and a whole session's worth at once can fill a CI disk."""
    folder = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def train_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    return train_tokenizer()


# One tiny config per newer architecture, each with the features that set it apart (layer kinds
# both present, prompts in the tests longer than the sliding window).
ARCH_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "gemma3": (
        "gemma3",
        {
            "head_dim": 32,  # not hidden / heads, as Gemma 3's 256
            "sliding_window": 6,
            "layer_types": ["sliding_attention", "full_attention"],
            "query_pre_attn_scalar": 24,
            "tie_word_embeddings": True,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            },
        },
    ),
    "gemma2": (
        "gemma2",
        {
            "head_dim": 16,
            "sliding_window": 6,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 3.0,
            "query_pre_attn_scalar": 16,
        },
    ),
    "qwen3": ("qwen3", {"head_dim": 32}),
    "phi3": (
        "phi3",
        {
            "sliding_window": 7,
            "original_max_position_embeddings": 128,
            "rope_scaling": {
                "rope_type": "longrope",
                "short_factor": [1.0 + 0.1 * i for i in range(8)],
                "long_factor": [2.0 + i for i in range(8)],
            },
        },
    ),
}


def hf_model(arch: str = "llama", **overrides: Any) -> Any:
    """A random transformers model (the oracle) with TINY's shape plus overrides."""
    import transformers

    classes = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
        "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    }
    config_cls, model_cls = (getattr(transformers, n) for n in classes[arch])
    torch.manual_seed(0)
    config = config_cls(**{**TINY, "pad_token_id": None, **overrides})
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    with torch.no_grad():  # random init has tiny weights; widen them so logits discriminate
        for p in model.parameters():
            p.mul_(4.0) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf_folder(model: Any, tokenizer: Any, folder: Path, shard: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(
        folder, safe_serialization=True, max_shard_size="100KB" if shard else "10GB"
    )
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE}
        )
    )
    return folder


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (the inverse of our import)."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


# byte offsets of the fp16 super-block scales in a block (d, and dmin where there is one)
SUPER_BLOCK_SCALES = {"Q4_K": (0, 2), "Q6_K": (208,), "Q2_K": (80, 82), "Q3_K": (108,)}


def write_gguf(
    model: Any,
    tokenizer: Any,
    path: Path,
    arch: str = "llama",
    pre: str = "smollm",
    blocks: str | None = None,
    written: dict[str, Any] | None = None,
    mix: dict[str, str] | None = None,
    chat_template: bool = True,
) -> Path:
    """A GGUF file as llama.cpp's converter writes it (permuted q/k for llama): F32 tensors, or
    with `blocks` ("Q4_1", "Q4_0") the blocks' matrices in that type and the embedding table in
    Q8_0, as llama.cpp quantizes a small model (SmolLM2's Q4_1 file). A type gguf-py cannot
    quantize (the k- and i-quants) gets random blocks instead, every byte below 0x40 so that
    each fp16 scale in them is finite (Q4_K's and Q6_K's super-block scales set small, so the
    weights are of a trained model's size); `mix` gives some tensors (by GGUF name) a type of
    their own, as a Q4_K_M file does; `written` receives each block matrix's raw blocks;
    without `chat_template`, a base model's file (none)."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope)
    w.add_rope_freq_base(rope.get("rope_theta") or cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    # what llama.cpp's convert_hf_to_gguf adds for each architecture
    if arch in ("qwen3", "gemma2", "gemma3"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch in ("gemma2", "gemma3", "phi3") and cfg.sliding_window:
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if arch == "gemma3" and cfg.layer_types != [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
        for i in range(cfg.num_hidden_layers)
    ]:  # llama.cpp's Gemma 3 default is one full layer in six; others say which
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
    if arch == "gemma3" and rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if arch == "llama" and rope.get("rope_type") == "llama3":
        # llama.cpp's converter: the llama3 rule as one divisor per frequency (rope_freqs)
        base = rope.get("rope_theta") or cfg.rope_theta
        freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
        old_len = rope["original_max_position_embeddings"]
        low, high = old_len / rope["low_freq_factor"], old_len / rope["high_freq_factor"]
        factors = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < high:
                factors.append(1.0)
            elif wavelen > low:
                factors.append(rope["factor"])
            else:
                smooth = (old_len / wavelen - rope["low_freq_factor"]) / (
                    rope["high_freq_factor"] - rope["low_freq_factor"]
                )
                factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
        w.add_tensor("rope_freqs.weight", np.array(factors, np.float32))
    if arch == "phi3" and rope.get("rope_type") == "longrope":
        original = rope["original_max_position_embeddings"]
        factor = cfg.max_position_embeddings / original
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(factor) / math.log(original)))
        w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))
    vocab = tokenizer.get_vocab()
    tokens = [""] * cfg.vocab_size
    for text, i in vocab.items():
        tokens[i] = text
    for i in range(len(vocab), cfg.vocab_size):
        tokens[i] = f"[PAD{i}]"
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else (5 if t.startswith("[PAD") else 1) for t in tokens])
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(CHAT_TEMPLATE)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}
    block = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "self_attn.qkv_proj": "attn_qkv",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.gate_up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    if arch in ("gemma2", "gemma3"):
        block.update(
            post_attention_layernorm="post_attention_norm",
            pre_feedforward_layernorm="ffn_norm",
            post_feedforward_layernorm="post_ffw_norm",
        )
    for name, tensor in model.state_dict().items():
        name = name.removeprefix("model.")
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = tensor.float().numpy().copy()
        if arch in ("gemma2", "gemma3") and name.endswith("norm.weight"):
            array = array + 1.0  # llama.cpp stores Gemma's norms as the 1 + w they apply
        parts = name.split(".")
        if parts[0] == "layers":
            module, kind = ".".join(parts[2:-1]), parts[-1]
            if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = cfg.num_attention_heads if "q_" in module else cfg.num_key_value_heads
                array = permute_qk(array, heads)
            gname = f"blk.{parts[1]}.{block[module]}.{kind}"
        else:
            gname = f"{names[parts[0]]}.{parts[1]}"
        kind = None
        if blocks and array.ndim == 2:
            kind = gguf.GGMLQuantizationType[blocks if parts[0] == "layers" else "Q8_0"]
        if mix and gname in mix:
            kind = gguf.GGMLQuantizationType[mix[gname]]
        if kind is None:
            w.add_tensor(gname, array)
            continue
        try:
            raw = gguf.quants.quantize(array, kind)
        except NotImplementedError:
            width, size = gguf.constants.GGML_QUANT_SIZES[kind]
            shape = (array.shape[0], array.shape[1] // width * size)
            raw = np.random.default_rng(len(gname)).integers(0, 0x40, shape, dtype=np.uint8)
            small = np.array([1e-4], np.float16).view(np.uint8)
            for start in SUPER_BLOCK_SCALES.get(kind.name, ()):
                raw.reshape(-1, size)[:, start : start + 2] = small
        if written is not None:
            written[gname] = raw
        w.add_tensor(gname, raw, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def tiny_hf(tiny_tokenizer: Any) -> Any:
    return hf_model("llama")


@pytest.fixture(scope="session")
def tiny_folder(
    tmp_path_factory: pytest.TempPathFactory, tiny_hf: Any, tiny_tokenizer: Any
) -> Path:
    return save_hf_folder(tiny_hf, tiny_tokenizer, tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_hf: Any, tiny_tokenizer: Any) -> Path:
    return write_gguf(tiny_hf, tiny_tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_gguf_q41(
    tmp_path_factory: pytest.TempPathFactory, tiny_hf: Any, tiny_tokenizer: Any
) -> Path:
    """The tiny model as a Q4_1 GGUF (blocks Q4_1, embeddings Q8_0), like the default model."""
    folder = tmp_path_factory.mktemp("gguf-q41")
    return write_gguf(tiny_hf, tiny_tokenizer, folder / "tiny-q4_1.gguf", blocks="Q4_1")


@pytest.fixture(scope="session")
def tiny_tflite_build(
    tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> subprocess.CompletedProcess[str]:
    """`infopt-pack build --runtime tflite --json` of the tiny GGUF (fp32; ~25 s), run as a user
    runs it: its stdout must be the JSON summary alone, whatever the converter prints."""
    out = tmp_path_factory.mktemp("tflite") / "bundle"
    cmd = [sys.executable, "-m", "infopt.cli", "build", str(tiny_gguf), "-d", "host"]
    cmd += ["--runtime", "tflite", "--context", "96", "-o", str(out), "--json"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)


@pytest.fixture(scope="session")
def tiny_tflite_bundle(tiny_tflite_build: subprocess.CompletedProcess[str]) -> Path:
    return Path(json.loads(tiny_tflite_build.stdout)["bundle"])


@pytest.fixture(scope="session")
def load_tiny(tiny_gguf: Path, request: pytest.FixtureRequest) -> Any:
    """`load_tiny(runtime, max_context)`: infopt.load of the tiny GGUF on `runtime`; LiteRT's
    models come from the one tflite bundle, built on first use."""
    import infopt

    def load(runtime: str, max_context: int) -> Any:
        if runtime != "tflite":
            return infopt.load(tiny_gguf, runtime=runtime, max_context=max_context)
        bundle = request.getfixturevalue("tiny_tflite_bundle")
        return infopt.load(bundle, max_context=max_context)

    return load
