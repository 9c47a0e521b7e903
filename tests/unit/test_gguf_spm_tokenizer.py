"""SentencePiece BPE vocabularies in GGUF (`tokenizer.ggml.model` "llama": Llama 1/2, Mistral,
Phi-3, Gemma 2/3): tiny hand-made vocabularies with hand-worked ids, checked against transformers'
own GGUF tokenizer converter on the same metadata, and against transformers loading a real Gemma 3
file where one is at hand."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as HFTokenizer

from infopt.core.tokenizer import StreamDecoder, Tokenizer, tokenizer_from_gguf_metadata
from infopt.errors import InvalidArgumentError, ModelFormatError, UnsupportedModelError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6
BYTES = [f"<0x{b:02X}>" for b in range(256)]


def spm_meta(specials: list[tuple[str, int]], pieces: list[str], **extra: Any) -> dict[str, Any]:
    """GGUF metadata as llama.cpp writes a SentencePiece vocabulary: `specials` (token, type),
    then the 256 byte tokens, then `pieces` scored best-first (-0, -1, ...) as SentencePiece does,
    so a piece's score follows its place unless `scores` overrides some."""
    tokens = [t for t, _ in specials] + BYTES + pieces
    types = [k for _, k in specials] + [BYTE] * 256 + [NORMAL] * len(pieces)
    scores = [-1000.0] * len(specials) + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    for token, score in extra.pop("scores", {}).items():
        scores[tokens.index(token)] = score
    for token, kind in extra.pop("types", {}).items():
        types[tokens.index(token)] = kind
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        **extra,
    }


CHARS = ["▁", "h", "e", "l", "o", "w", "r", "d", "<", "0", "x", "4", "1", ">", "i", "!"]
# Best first, as SentencePiece learned them: each merge a piece of the two before it.
MERGED = ["ll", "▁h", "or", "▁he", "llo", "ld", "▁w", "▁hello", "▁wor", "▁world", "he", "hello"]


def llama_meta(**extra: Any) -> dict[str, Any]:
    """Llama 2's shape: <unk> <s> </s>, bytes, pieces; a space prepended to the text."""
    specials = [("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL), ("<tool>", USER_DEFINED)]
    meta = {
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        **extra,
    }
    return spm_meta(specials, [*MERGED, "0x", "<0x", "41", "41>", *CHARS], **meta)


def gemma_meta(**extra: Any) -> dict[str, Any]:
    """Gemma 3's shape: <pad> <eos> <bos> <unk> <mask>, turn markers, user-defined newline and
    space runs (llama.cpp writes the spaces as spaces, scored -1000), bytes, pieces; nothing
    prepended."""
    specials = [
        ("<pad>", CONTROL),
        ("<eos>", CONTROL),
        ("<bos>", CONTROL),
        ("<unk>", CONTROL),
        ("<mask>", CONTROL),
        ("<start_of_turn>", CONTROL),
        ("<end_of_turn>", CONTROL),
        ("\n", USER_DEFINED),
        ("  ", USER_DEFINED),
        ("   ", USER_DEFINED),
    ]
    meta = {
        "general.architecture": "gemma3",
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": False,
        **extra,
    }
    return spm_meta(specials, [*MERGED, "▁t", "t", *CHARS], **meta)


def ids(meta: dict[str, Any], *tokens: str) -> list[int]:
    vocab = meta["tokenizer.ggml.tokens"]
    return [vocab.index(t) for t in tokens]


TEXTS = [
    "hello world",
    "hello  world",
    " hello",
    "  hello",
    "hello ",
    "   ",
    "",
    "héllo wörld",
    "hello\nworld\n\n",
    "tab\there",
    "😀 world",
    "中文",
    "hi! <0x41>",
    "world  the",
    "hello     t",
]


# -- hand-worked ids ---------------------------------------------------------------------------


def test_llama_vocabulary_prepends_a_space_and_merges_best_first() -> None:
    meta = llama_meta()
    tok = tokenizer_from_gguf_metadata(meta)
    # "▁hello▁world": ll, ▁h, or, ▁he, llo, ld, ▁w, ▁hello, ▁wor, ▁world, in that order
    assert tok.encode("hello world") == ids(meta, "<s>", "▁hello", "▁world")
    assert tok.encode("hello world", add_special_tokens=False) == ids(meta, "▁hello", "▁world")
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert tok.decode(tok.encode("hello world"), skip_special_tokens=False) == "<s> hello world"
    # SentencePiece (and llama.cpp) prepend even to text that starts with a space
    assert tok.encode("  hello", add_special_tokens=False) == ids(meta, "▁", "▁", "▁hello")
    assert tok.decode(ids(meta, "▁", "▁", "▁hello")) == "  hello"
    assert tok.add_bos_token and tok.bos_token_id == 1 and tok.eos_token_ids == (2,)
    assert tok.special_tokens == {"bos": "<s>", "eos": "</s>", "unk": "<unk>"}


def test_special_and_user_defined_tokens_are_matched_whole() -> None:
    meta = llama_meta()
    tok = tokenizer_from_gguf_metadata(meta)
    # after a special token the text gets its space again, as llama.cpp does
    assert tok.encode("<s>hello</s>", add_special_tokens=False) == ids(
        meta, "<s>", "▁hello", "</s>"
    )
    assert tok.encode("<s>hello") == ids(meta, "<s>", "▁hello")  # no second BOS
    assert tok.encode("<unk>", add_special_tokens=False) == ids(meta, "<unk>")
    assert tok.encode("hello<tool>", add_special_tokens=False) == ids(meta, "▁hello", "<tool>")
    assert tok.decode(ids(meta, "▁hello", "<tool>", "</s>")) == "hello<tool>"


def test_byte_fallback_spells_what_the_vocabulary_lacks() -> None:
    meta = llama_meta()
    tok = tokenizer_from_gguf_metadata(meta)
    # é is 0xC3 0xA9 in UTF-8
    assert tok.encode("hé", add_special_tokens=False) == ids(meta, "▁h", "<0xC3>", "<0xA9>")
    assert tok.decode(tok.encode("hé 😀")) == "hé 😀"


def test_text_spelling_a_byte_token_stays_text() -> None:
    # "<0x" + "41>" would name the byte token <0x41> ("A"); SentencePiece never merges into one
    meta = llama_meta()
    tok = tokenizer_from_gguf_metadata(meta)
    assert tok.encode("<0x41>", add_special_tokens=False) == ids(meta, "▁", "<0x", "41>")
    assert tok.decode(tok.encode("<0x41>")) == "<0x41>"


def test_merges_follow_the_scores() -> None:
    # "llo" is ll+o or l+lo: the better-scored piece decides which merge runs first
    pieces = ["ll", "lo", "▁", "l", "o"]
    meta = spm_meta([("<unk>", UNKNOWN)], pieces, scores={"lo": 1.0})
    assert tokenizer_from_gguf_metadata(meta).encode("llo", add_special_tokens=False) == ids(
        meta, "▁", "l", "lo"
    )
    meta = spm_meta([("<unk>", UNKNOWN)], pieces)
    assert tokenizer_from_gguf_metadata(meta).encode("llo", add_special_tokens=False) == ids(
        meta, "▁", "ll", "o"
    )


def test_merges_of_equal_score_go_as_transformers_orders_them() -> None:
    # transformers' generate_merges breaks a tie of scores by the longer left part, then the
    # longer right part: ab+x before x+c, x+bc before a+x
    pieces = ["bc", "ab", "ax", "xbc", "abx", "xc", "▁", "a", "x", "b", "c"]
    tied = {"ax": -5.0, "xbc": -5.0, "abx": -7.0, "xc": -7.0}
    meta = spm_meta([("<unk>", UNKNOWN)], pieces, scores=tied)
    tok = tokenizer_from_gguf_metadata(meta)
    assert tok.encode("axbc", add_special_tokens=False) == ids(meta, "▁", "a", "xbc")
    assert tok.encode("abxc", add_special_tokens=False) == ids(meta, "▁", "abx", "c")
    theirs = transformers_backend(meta, "phi3")
    for text in ("axbc", "abxc", "abc", "xbcax", "axax bc", "abxbc"):
        assert tok.encode(text, False) == theirs.encode(text, add_special_tokens=False).ids


def test_gemma_vocabulary_prepends_nothing_and_keeps_space_runs() -> None:
    meta = gemma_meta()
    tok = tokenizer_from_gguf_metadata(meta)
    assert tok.encode("hello world") == ids(meta, "<bos>", "hello", "▁world")
    assert tok.encode(" hello", add_special_tokens=False) == ids(meta, "▁hello")
    # "  " is stored with real spaces; it is the piece "▁▁", and Gemma merges in vocabulary
    # order (its -1000 score would put ▁+t first, giving ▁ ▁t)
    assert tok.encode("  t", add_special_tokens=False) == ids(meta, "  ", "t")
    assert tok.encode("  t", add_special_tokens=False) != ids(meta, "▁", "▁t")
    assert tok.encode("hello\n\nworld", add_special_tokens=False) == ids(
        meta, "hello", "\n", "\n", "w", "or", "ld"
    )
    assert tok.encode("<start_of_turn>user\nhi<end_of_turn>\n", add_special_tokens=False)[
        :1
    ] == ids(meta, "<start_of_turn>")
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("hi"), skip_special_tokens=False) == "<bos>hi"
    assert tok.encode("") == ids(meta, "<bos>") and tok.encode("", add_special_tokens=False) == []


def test_bos_and_eos_flags() -> None:
    meta = llama_meta()
    assert tokenizer_from_gguf_metadata(meta).add_bos_token  # SentencePiece's default
    tok = tokenizer_from_gguf_metadata(llama_meta(**{"tokenizer.ggml.add_bos_token": False}))
    assert tok.encode("hello") == ids(meta, "▁hello")
    tok = tokenizer_from_gguf_metadata(llama_meta(**{"tokenizer.ggml.add_eos_token": True}))
    assert tok.encode("hello") == ids(meta, "<s>", "▁hello", "</s>")
    assert tok.encode("hello", add_special_tokens=False) == ids(meta, "▁hello")
    assert tok.decode(tok.encode("hello")) == "hello"


def test_add_space_prefix_false_on_a_llama_vocabulary() -> None:
    meta = llama_meta(**{"tokenizer.ggml.add_space_prefix": False})
    tok = tokenizer_from_gguf_metadata(meta)
    assert tok.encode("hello world", add_special_tokens=False) == ids(meta, "hello", "▁world")
    assert tok.decode(ids(meta, "▁hello")) == " hello"  # nothing was prepended, nothing cut


def test_stream_decoding_and_the_serialized_backend_agree() -> None:
    tok = tokenizer_from_gguf_metadata(llama_meta())
    text = "hello wörld 😀 world"
    encoded = tok.encode(text, add_special_tokens=False)
    stream = StreamDecoder(tok)
    assert "".join(stream.push(i) for i in encoded) + stream.flush() == text
    # a token limit that cuts the emoji's byte tokens: no U+FFFD, the cut character is left out
    cut = tok.encode("hello 😀", add_special_tokens=False)[:-1]
    assert tok.decode(cut).endswith("\ufffd")  # what a plain decode of the cut ids says
    stream = StreamDecoder(tok)
    assert "".join(stream.push(i) for i in cut) + stream.flush() == "hello "
    # byte fallback decodes a whole run of byte tokens to U+FFFD when its end is cut: a
    # complete character before the cut one in the same run is kept, as it was streamed
    meta = llama_meta()
    hello = tok.encode("hello", add_special_tokens=False)

    def byte_ids(data: bytes) -> list[int]:
        return ids(meta, *(f"<0x{b:02X}>" for b in data))

    for whole, data in (("😀", "😀".encode() + b"\xf0\x9f"), ("你", "你好".encode()[:5])):
        stream = StreamDecoder(tok)
        cut = hello + byte_ids(data)
        assert "".join(stream.push(i) for i in cut) + stream.flush() == "hello" + whole
    # bytes that never decode (a lone continuation byte) keep their U+FFFD, as a plain decode
    # has them, at the end too: only a character cut short is left out
    lone = byte_ids(b"\x80")
    for garbage in (hello + lone + hello, lone * 6):
        stream = StreamDecoder(tok)
        streamed = "".join(stream.push(i) for i in garbage) + stream.flush()
        assert streamed == tok.decode(garbage) and "\ufffd" in streamed
    # a bundle stores the backend as tokenizer.json
    again = HFTokenizer.from_str(tok.backend.to_str())
    assert again.encode(text, add_special_tokens=False).ids == encoded


def test_no_chat_template_is_a_clear_refusal_and_a_template_renders() -> None:
    tok = tokenizer_from_gguf_metadata(gemma_meta())
    assert tok.chat_template is None
    with pytest.raises(InvalidArgumentError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])
    template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    meta = gemma_meta(**{"tokenizer.chat_template": template})
    tok = tokenizer_from_gguf_metadata(meta)
    rendered = tok.render_chat([{"role": "user", "content": "hello"}])
    assert rendered == "<bos><start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n"
    chat = tok.encode_chat([{"role": "user", "content": "hello"}])
    assert chat[:2] == ids(meta, "<bos>", "<start_of_turn>") and chat.count(2) == 1
    assert tok.decode(chat, skip_special_tokens=False) == rendered


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "t5", "rwkv", None])
def test_other_kinds_are_unsupported_naming_the_supported(kind: str | None) -> None:
    with pytest.raises(UnsupportedModelError, match=rf"{kind!r} is not supported.*'gpt2'.*'llama'"):
        tokenizer_from_gguf_metadata(llama_meta(**{"tokenizer.ggml.model": kind}))


def _without(meta: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k != key}


def _scores(meta: dict[str, Any], scores: list[Any]) -> dict[str, Any]:
    return {**meta, "tokenizer.ggml.scores": scores}


DAMAGED = {
    "no scores": (
        _without(llama_meta(), "tokenizer.ggml.scores"),
        r"'tokenizer.ggml.scores' is missing",
    ),
    "a score short": (
        _scores(llama_meta(), llama_meta()["tokenizer.ggml.scores"][:-1]),
        r"has 292 tokens but 291 token scores",
    ),
    "a NaN score": (
        _scores(llama_meta(), [math.nan, *llama_meta()["tokenizer.ggml.scores"][1:]]),
        r"scores' holds a value that is not a number",
    ),
    "a score that is text": (
        _scores(llama_meta(), ["x", *llama_meta()["tokenizer.ggml.scores"][1:]]),
        r"scores' holds a value that is not a number",
    ),
    "no tokens": (
        _without(llama_meta(), "tokenizer.ggml.tokens"),
        r"'tokenizer.ggml.tokens' is missing",
    ),
    "a token type short": (
        {**llama_meta(), "tokenizer.ggml.token_type": [1] * 10},
        r"has 292 tokens but 10 token types",
    ),
    "a token type that is text": (
        {**llama_meta(), "tokenizer.ggml.token_type": ["x"] * 292},
        r"token_type' holds a value that is not an integer",
    ),
    "EOS outside the vocabulary": (
        llama_meta(**{"tokenizer.ggml.eos_token_id": 292}),
        r"eos token id 292 is outside the vocabulary of 292",
    ),
    "BOS stored as text": (
        llama_meta(**{"tokenizer.ggml.bos_token_id": "1"}),
        r"bos token id is '1', not an integer",
    ),
    "add_space_prefix as text": (
        llama_meta(**{"tokenizer.ggml.add_space_prefix": "no"}),
        r"'tokenizer.ggml.add_space_prefix' is 'no', not true or false",
    ),
}


@pytest.mark.parametrize("case", DAMAGED)
def test_damaged_metadata_is_a_model_format_error(case: str) -> None:
    meta, message = DAMAGED[case]
    with pytest.raises(ModelFormatError, match=message):
        tokenizer_from_gguf_metadata(meta)


def test_a_stray_padding_id_is_ignored_as_llama_cpp_does() -> None:
    tok = tokenizer_from_gguf_metadata(llama_meta(**{"tokenizer.ggml.padding_token_id": 10**6}))
    assert "pad" not in tok.special_tokens and tok.encode("hi")[0] == 1


# -- against transformers ----------------------------------------------------------------------


def transformers_backend(meta: dict[str, Any], architecture: str) -> HFTokenizer:
    """The `tokenizers` object transformers' GGUF converter builds from this metadata."""
    gguf = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    renames = gguf.GGUF_TOKENIZER_MAPPING["tokenizer"]
    tokenizer_dict = {
        name: meta[f"tokenizer.{key}"]
        for key, name in renames.items()
        if f"tokenizer.{key}" in meta
    }
    backend, _ = gguf.convert_gguf_tokenizer(architecture, tokenizer_dict)
    return backend


@pytest.mark.parametrize(
    ("make", "architecture"),
    # transformers builds Llama files with Metaspace(prepend_scheme="first"), which prepends no
    # space to text that starts with one, nor after a special token; its Phi-3 builder is the
    # SentencePiece one (Prepend + Replace), which is the one llama.cpp and infopt follow.
    [(llama_meta, "phi3"), (gemma_meta, "gemma3")],
)
def test_same_ids_and_text_as_transformers_converter(make: Any, architecture: str) -> None:
    meta = make()
    ours = tokenizer_from_gguf_metadata(meta)
    theirs = transformers_backend(meta, architecture)
    texts = [t for t in TEXTS if "<0x" not in t]  # transformers merges "<0x" "41>" into a byte
    texts += ["<start_of_turn>user\nhello<end_of_turn>\n", "<s>hello</s>"]
    for text in texts:
        encoded = ours.encode(text, add_special_tokens=False)
        assert encoded == theirs.encode(text, add_special_tokens=False).ids, text
        for skip in (False, True):
            assert ours.decode(encoded, skip) == theirs.decode(encoded, skip_special_tokens=skip)


# -- a real Gemma 3 file, where one is at hand -------------------------------------------------

GEMMA3_GGUF = Path(
    os.environ.get("INFOPT_GEMMA3_GGUF", "/tmp/models-probe/models/gemma-3-270m-q4_k_m.gguf")
)
REAL_TEXTS = [
    *TEXTS,
    "The quick brown fox jumps over the lazy dog.",
    "multiple    spaces   inside\t\ttabs",
    "def f(x):\n    return x * 2  # double\n",
    "👨‍👩‍👧‍👦 日本語のテキスト 한국어",
    "<start_of_turn>user\nhi<end_of_turn>\n",
    "12345 67890 3.14159 1,000,000",
    "\r\nwindows\r\nlines",
]


@pytest.mark.skipif(not GEMMA3_GGUF.exists(), reason=f"{GEMMA3_GGUF} is not here")
def test_real_gemma3_file_matches_transformers_loading_it() -> None:
    from transformers import AutoTokenizer

    from infopt.importers.gguf_file import open_reader, read_metadata

    ours: Tokenizer = tokenizer_from_gguf_metadata(read_metadata(open_reader(GEMMA3_GGUF)))
    theirs = AutoTokenizer.from_pretrained(
        str(GEMMA3_GGUF.parent), gguf_file=GEMMA3_GGUF.name, local_files_only=True
    )
    assert ours.vocab_size == 262144 and ours.chat_template is None
    for text in REAL_TEXTS:
        for special in (True, False):
            encoded = theirs.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == encoded, text
            for skip in (False, True):
                assert ours.decode(encoded, skip) == theirs.decode(
                    encoded, skip_special_tokens=skip
                )
