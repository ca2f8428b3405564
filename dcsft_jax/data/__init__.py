"""Data: sources -> records -> processor -> batches.

records.py   the Record type; readers for the paper's JSON files and HF datasets; ms-swift writer
tfds_source.py  ImageNet / ImageNet-R / ImageNet-A / RefCOCO from a prepared TFDS data_dir
builtin.py   the embedded default dataset (scikit-learn digits; font renditions; corrupted digits)
tokenizer.py the tiny model's byte-level BPE with Qwen's special tokens
processor.py image -> patches, chat template -> ids, loss mask, M-RoPE positions (= transformers)
batching.py  buckets, static-shape batches, per-host rows, prefetch, exact resume
"""
