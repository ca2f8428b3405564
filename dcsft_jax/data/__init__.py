"""Data: the tiny tokenizer and the Qwen2.5-VL processor (chat template, image patches, M-RoPE positions)."""
