"""Encoders: pooling hidden states into text embeddings (`pooling`), and sequence classification: the
classifier model, its files and prediction (`classify`), its fine-tuning (`finetune`) and its commands."""
