"""Fine-tuning: instruction tuning (SFT), preference tuning (DPO), reward models and LoRA adapters.

`sft` holds `FinetuneRun` (a pretrained model, full or with adapters, on the shared training loop of
`lmforge.train.loop`) and the SFT objective; `dpo` the preference objectives and reward models; `data`
reads and tokenizes conversations and preference pairs; `lora` the low-rank adapters.

Names are re-exported lazily, so importing one submodule (e.g. `lmforge.finetune.lora` for `--adapter`)
does not load the training code.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "FinetuneConfig": "sft", "FinetuneRun": "sft", "finetune_sft": "sft", "sft_loss": "sft",
    "DPOConfig": "dpo", "DPORun": "dpo", "RewardRun": "dpo", "RewardModel": "dpo", "dpo_loss": "dpo",
    "finetune_dpo": "dpo", "finetune_reward": "dpo", "score": "dpo",
    "load_conversations": "data", "detect_format": "data", "encode_conversation": "data", "build_pairs": "data",
    "parse_hh": "data",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
