"""Training: the loop every run shares, and pretraining from scratch.

`loop` owns optimizer steps (accumulation, clipping, the learning-rate schedule), evaluation and
checkpoint cadence, resumable checkpoints, signals and metrics; a run plugs in an objective and a data
source. `distributed` joins torchrun jobs. `pretrain` trains a fresh model on token shards that `data`
prepares from a corpus (`corpus` reads its files) with a tokenizer `tokenizer` trains; `presets` are
named recipes, `plot` draws a run's curves, `commands` holds the CLI. Fine-tuning objectives live in
`lmforge.finetune`, classification in `lmforge.encoders`.
"""
