"""How tests/data/legacy/tiny-v1 was made: a bundle written by infopt 0.1.0 before the layout
of its library changed (commit 6447df8), kept so that every later infopt is shown to load it and
generate the same tokens (`tests/unit/test_legacy_bundle.py`). Do not re-run it to refresh the
fixture: the point is that the files were written by the old code.

    python tests/data/legacy/make_v1_bundle.py tests/data/legacy
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tests.conftest import hf_model, train_tokenizer, write_gguf

# Small enough to commit (every artifact is a few hundred kB), with MQA (head_dim 16, as ONNX
# Runtime's attention needs) and untied embeddings.
SHAPE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}
PROMPTS = [
    [{"role": "user", "content": "hello there"}],
    "The quick brown fox",
    [{"role": "user", "content": "def add(a, b):"}],
]
LOADABLE = ("pytorch", "onnxruntime", "openvino", "tflite")


def main(out_dir: Path) -> None:
    import infopt
    from infopt.bundle.build import build

    tok = train_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        gguf = write_gguf(hf_model("llama", **SHAPE), tok, Path(tmp) / "tiny.gguf")
        bundle = out_dir / "tiny-v1"
        if bundle.exists():
            shutil.rmtree(bundle)
        build(
            gguf,
            bundle,
            device="host",
            runtime="pytorch,onnxruntime,openvino,tflite,coreml",
            context=64,
            speculative="self",
        )
    expected: dict[str, object] = {}
    for runtime in LOADABLE:
        m = infopt.load(bundle, runtime=runtime)
        runs = []
        for prompt in PROMPTS:
            plain = m.generate(prompt, max_new_tokens=12, stop_token_ids=[], speculative=False)
            spec = m.generate(prompt, max_new_tokens=12, stop_token_ids=[])
            runs.append({"plain": plain.token_ids, "speculative": spec.token_ids})
        m.runtime.reset()
        logits = m.runtime.forward(m.encode_prompt(PROMPTS[1]), only_last=True)[-1]
        top = logits.argsort()[::-1][:2]
        expected[runtime] = {
            "tokens": runs,
            "first_logits_top2": [[int(i), float(logits[i])] for i in top],
        }
    (out_dir / "tiny-v1.expected.json").write_text(
        json.dumps({"prompts": PROMPTS, "max_new_tokens": 12, "runtimes": expected}, indent=1)
        + "\n"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
