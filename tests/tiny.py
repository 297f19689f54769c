"""Overrides shared by the tests that run the recipe end to end: tiny models and a small batch, so that a run
takes seconds on two CPU cores."""

# GPT-2 (the default model family) at 2 layers x 64.
TINY_GPT2 = ["model.n_layer=2", "model.hidden_size=64", "model.n_head=2"]

# A 2-layer Llama small enough for multi-process recipe runs on CPU (GQA: 2 query heads, 1 key/value head).
TINY_LLAMA = [
    "model=llama_tiny",
    "model.n_layer=2",
    "model.hidden_size=64",
    "model.n_head=2",
    "model.n_kv_head=1",
    "model.intermediate_size=172",
]

# 4 sequences of 32 tokens per step in micro-batches of 2, a 1024-token validation set, no progress bar.
TINY_RUN = [
    "train.seq_len=32",
    "train.batch_size=4",
    "train.micro_batch_size=2",
    "train.eval_tokens=1024",
    "logger.progress=false",
]
