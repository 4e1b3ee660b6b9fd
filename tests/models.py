"""Tiny real transformers models built from a config (seeded random weights), and helpers that fill
and read their adapters."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sigmatune import SigmaModel, read_adapter

TINY_LLAMA = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.1,  # larger than the default 0.02, so the spectra carry the model
)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    """A 2-layer LlamaForCausalLM with seeded random weights (hidden 32, MLP 48, vocab 96)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides}))
    return model.to(dtype).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 (its linear layers are transformers' transposed Conv1D)."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def token_batch(seed: int = 1, batch: int = 2, length: int = 12, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(texts: list[str]):
    """A real byte-level BPE tokenizer trained on texts, with a ChatML chat template (as SmolLM2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    return fast


def save_tiny_chat_model(folder, texts: list[str], seed: int = 0, **overrides):
    """A tiny Llama (TINY_LLAMA with overrides) and its tokenizer saved as a from_pretrained folder;
    returns the folder."""
    tokenizer = tiny_tokenizer(texts)
    model = tiny_llama(seed, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, **overrides)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def randomize(model: SigmaModel, seed: int = 0, scale: float = 0.2) -> None:
    """Give every trainable vector seeded random values (as if trained)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def logits(model, ids=None):
    """The model's logits on ids (default: token_batch()), without gradients."""
    with torch.no_grad():
        return model(ids if ids is not None else token_batch()).logits


def vectors(folder: Path) -> dict[str, torch.Tensor]:
    """The trained vector of every layer of a saved adapter."""
    return {name: layer.vector for name, layer in read_adapter(folder).layers.items()}


def assert_compiled_matches_eager(model) -> None:
    """torch.compile(fullgraph=True) of the model (aot_eager) gives the eager logits and gradients."""
    ids = token_batch()
    eager = model(ids, labels=ids)
    eager.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.logits, eager.logits, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)
