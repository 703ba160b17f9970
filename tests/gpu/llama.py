"""A random-weight Llama with a word-level tokenizer, built for the GPU checks (no hub on the GPU machines)."""
from __future__ import annotations

import random

BOS, EOS, PAD = 1, 2, 0


def build_llama(path, layers: int, hidden: int, vocab: int, seed: int = 0) -> str:
    """Save a float32 LlamaForCausalLM of `layers` x `hidden` and its tokenizer to `path`; returns it as str.
    Built on the first GPU where there is one: seconds instead of a minute for the larger models."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = {"<unk>": PAD, "<s>": BOS, "</s>": EOS, **{f"w{i}": i for i in range(3, vocab)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<unk>")),
                                  unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>")
    heads = max(1, hidden // 64)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=max(64, int(hidden * 2.75) // 64 * 64),
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=min(8, heads),
                         max_position_embeddings=2048, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(seed)
    with torch.device("cuda:0" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    return str(path)


def prompts(n: int, vocab: int, seed: int = 1, avoid_length: int | None = None) -> list:
    """n prompts of BOS and 4 to 43 random word ids; none of length `avoid_length`."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = 5 + (i * 7) % 40
        length += length == avoid_length
        out.append([BOS] + [rng.randrange(3, vocab) for _ in range(length - 1)])
    return out


def greedy_in_process(path: str, batch: list, new_tokens: int, device: str) -> list:
    """Plain `model.generate`, greedy, one prompt at a time, every token generated (no EOS stop): the
    reference the served outputs must equal token for token."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    # No EOS at all (not min_new_tokens, which would mask EOS's logit and so change the argmax).
    model.generation_config.eos_token_id = None
    out = []
    with torch.no_grad():
        for p in batch:
            ids = torch.tensor([p], device=device)
            row = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, pad_token_id=PAD)[0]
            out.append(row[len(p):].tolist())
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out
