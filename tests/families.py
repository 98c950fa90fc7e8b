"""Tiny random-init checkpoints of each supported family, paired with real tokenizers from ../shared.

Each builder writes a Hugging Face checkpoint folder (config, safetensors, tokenizer files) and returns it.
The weights are random but scaled so that the logits are decisive; nothing is downloaded.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"  # ../shared: real tokenizers and models (README)
TOKENIZERS = SHARED / "tokenizers"
STORIES = SHARED / "models" / "stories260K" / "hf"
SMOLLM2 = SHARED / "models" / "smollm2-135m-instruct"  # a GGUF; tools/gguf_to_hf.py writes the checkpoint


def shared(path: Path) -> Path:
    """`path` under ../shared, or a skip that names it: a clone without ../shared still runs every other test."""
    if not path.exists():
        pytest.skip(f"needs ../{path.relative_to(SHARED.parent)} (the project's shared fixtures, see README), "
                    f"which is absent")
    return path

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set first = '' %}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
ZEPHYR_TEMPLATE = (  # TinyLlama-1.1B-Chat's template
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)


@dataclass
class Family:
    name: str  # test id
    config_class: str  # transformers config class
    tokenizer: str  # folder under ../shared/tokenizers, or "trained" for a tokenizer trained here
    overrides: dict = field(default_factory=dict)  # config values beyond SMALL
    chat_template: str | None = None  # set where the tokenizer folder has none
    system_prompt: bool = True  # whether the chat template accepts a system message


FAMILIES = [
    Family("smollm2", "LlamaConfig", "gpt2", {"tie_word_embeddings": True}),
    Family("tinyllama", "LlamaConfig", "llama2", {"num_key_value_heads": 1, "tie_word_embeddings": False},
           chat_template=ZEPHYR_TEMPLATE),
    Family("llama3.2", "LlamaConfig", "llama3", {"tie_word_embeddings": True, "head_dim": 32, "rope_scaling": {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    Family("llama-linear-rope", "LlamaConfig", "llama2", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    Family("qwen2.5", "Qwen2Config", "qwen3", {"tie_word_embeddings": True}),
    Family("qwen3", "Qwen3Config", "qwen3", {"head_dim": 32, "tie_word_embeddings": True}),
    Family("phi3", "Phi3Config", "phi3", {"num_key_value_heads": 4, "tie_word_embeddings": False, "sliding_window": 8}),
    Family("phi3-longrope", "Phi3Config", "phi3", {"num_key_value_heads": 4, "rope_scaling": {
        "type": "longrope", "short_factor": [1.0 + i / 8 for i in range(8)],
        "long_factor": [2.0 + i for i in range(8)]},
        "original_max_position_embeddings": 64}),
    Family("mistral", "MistralConfig", "mistral", {"sliding_window": 8}, chat_template=MISTRAL_TEMPLATE,
           system_prompt=False),
    Family("gemma2", "Gemma2Config", "trained", {"head_dim": 16, "num_key_value_heads": 1, "sliding_window": 8,
                                                 "query_pre_attn_scalar": 16}, chat_template=GEMMA_TEMPLATE),
    Family("gemma3", "Gemma3TextConfig", "trained", {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16,
                                                     "layer_types": ["sliding_attention", "full_attention"]},
           chat_template=GEMMA_TEMPLATE),
]
# Big enough that weights, not the interpreter, dominate memory (42M parameters): for the memory estimate's test.
MID = Family("mid", "LlamaConfig", "llama2", {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
                                              "num_attention_heads": 8, "num_key_value_heads": 4,
                                              "max_position_embeddings": 1024, "tie_word_embeddings": True})
BY_NAME = {f.name: f for f in [*FAMILIES, MID]}


def write_tokenizer(family: Family, folder: Path) -> None:
    if family.tokenizer == "trained":
        train_tokenizer(folder)
    elif family.tokenizer == "mistral":
        shutil.copy(shared(TOKENIZERS / "mistral") / "tokenizer.model.v1", folder / "tokenizer.model")
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "legacy": True}))
    else:
        for file in shared(TOKENIZERS / family.tokenizer).iterdir():
            if file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(file, folder / file.name)
    if family.chat_template:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = family.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config))


def train_tokenizer(folder: Path) -> None:
    """A 512-token byte-level BPE with Gemma's special tokens (no small Gemma tokenizer is available offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = (Path(__file__).parent / "data" / "story.txt").read_text(encoding="utf-8")
    tok.train_from_iterator([text] * 4, trainer)
    from tokenizers.processors import TemplateProcessing
    tok.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}))


def build_checkpoint(family: Family, folder: Path) -> Path:
    """Write a random-init checkpoint of the family, sized to its tokenizer, into `folder`."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(family, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
    config = getattr(transformers, family.config_class)(vocab_size=len(tok), **{**SMALL, **family.overrides}, **special)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    return folder
