"""Training utilities (tokenizers for now)."""
