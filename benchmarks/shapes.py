"""Random-init checkpoints with the exact shapes of real small models, for speed and memory benchmarks.

    python benchmarks/shapes.py OUT_DIR [smollm2-135m|qwen2.5-0.5b ...] [--tokenizer DIR]

Speed does not depend on trained weights. Each folder gets a word-level tokenizer of exactly the model's
vocabulary size (made here; nothing is downloaded), so every exporter and peer can load it; or, with --tokenizer,
the files of a real tokenizer no larger than the vocabulary (e.g. ../shared/tokenizers/qwen3 for the Qwen2.5 shape:
its chat template, and text that splits as real text does, for the chat and prefix-cache benchmarks).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

SHAPES = {
    "smollm2-135m": ("LlamaConfig", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)),
    "qwen2.5-0.5b": ("Qwen2Config", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)),
}


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


def build(name: str, folder: Path, tokenizer: Path | None = None) -> Path:
    import torch
    import transformers

    class_name, values = SHAPES[name]
    config = getattr(transformers, class_name)(**values)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer is None:
        write_tokenizer(folder, values["vocab_size"])
    else:
        for file in tokenizer.iterdir():
            if file.is_file() and not file.name.startswith(("config", "generation_config")):
                shutil.copy(file, folder / file.name)
    return folder


if __name__ == "__main__":
    args = sys.argv[1:]
    real = Path(args.pop(args.index("--tokenizer") + 1)) if "--tokenizer" in args else None
    args = [a for a in args if a != "--tokenizer"]
    for name in args[1:] or list(SHAPES):
        print(build(name, Path(args[0]) / name, real))
