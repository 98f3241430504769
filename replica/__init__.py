"""One process per GPU: tokenizer, Qwen3 model, KV cache and the engine loop."""
