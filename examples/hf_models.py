"""Hugging Face transformers models built from small config objects with random init (no
download), as autotp targets: each factory returns (model, example_inputs, example_kwargs).
Full-size shapes are built on the meta device, so they plan in seconds without memory."""
from __future__ import annotations

import torch
from torch import nn


def _ids(vocab: int, batch: int, seq: int, device: str = "cpu") -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), device=device)


def gpt2(n_layer: int = 2, n_embd: int = 64, n_head: int = 4, vocab: int = 256, batch: int = 2,
         seq: int = 16, seed: int = 0) -> tuple[nn.Module, tuple, dict]:
    import transformers as T
    torch.manual_seed(seed)
    cfg = T.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab,
                       n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                       bos_token_id=0, eos_token_id=0)
    return T.GPT2LMHeadModel(cfg), (), {"input_ids": _ids(vocab, batch, seq), "use_cache": False}


def llama(n_layer: int = 2, hidden: int = 64, heads: int = 8, kv_heads: int = 4,
          intermediate: int = 128, vocab: int = 256, batch: int = 2, seq: int = 16,
          seed: int = 0, meta: bool = False, dtype: torch.dtype = torch.float32
          ) -> tuple[nn.Module, tuple, dict]:
    import transformers as T
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(num_hidden_layers=n_layer, hidden_size=hidden, num_attention_heads=heads,
                        num_key_value_heads=kv_heads, intermediate_size=intermediate,
                        vocab_size=vocab, max_position_embeddings=4096, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0)
    device = "meta" if meta else "cpu"
    with torch.device(device):
        model = T.LlamaForCausalLM(cfg).to(dtype)
    return model, (), {"input_ids": _ids(vocab, batch, seq, device), "use_cache": False}


def bert(n_layer: int = 2, hidden: int = 64, heads: int = 4, intermediate: int = 128,
         vocab: int = 256, batch: int = 2, seq: int = 16, seed: int = 0
         ) -> tuple[nn.Module, tuple, dict]:
    import transformers as T
    torch.manual_seed(seed)
    cfg = T.BertConfig(num_hidden_layers=n_layer, hidden_size=hidden, num_attention_heads=heads,
                       intermediate_size=intermediate, vocab_size=vocab,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return T.BertModel(cfg), (), {"input_ids": _ids(vocab, batch, seq)}


def llama2_7b() -> tuple[nn.Module, tuple, dict]:
    """Llama-2-7B shape on the meta device, bf16, input (1, 2048)."""
    return llama(n_layer=32, hidden=4096, heads=32, kv_heads=32, intermediate=11008,
                 vocab=32000, batch=1, seq=2048, meta=True, dtype=torch.bfloat16)


def llama2_70b() -> tuple[nn.Module, tuple, dict]:
    """Llama-2-70B shape on the meta device, bf16, input (1, 2048)."""
    return llama(n_layer=80, hidden=8192, heads=64, kv_heads=8, intermediate=28672,
                 vocab=32000, batch=1, seq=2048, meta=True, dtype=torch.bfloat16)
