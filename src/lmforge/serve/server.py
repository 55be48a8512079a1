"""The server's state: the model's engine driven by the scheduler, the metrics, and the model work other than
generation (prompt scoring, embeddings) that runs on the scheduler thread."""

from __future__ import annotations

import time
from collections.abc import Generator

import torch
import torch.nn.functional as F

from ..api import LM
from ..engine import TokenLogprob
from .edge import Edge
from .gate import ServerConfig
from .metrics import Metrics
from .scheduler import Scheduler

# Inputs embedded between two engine steps.
EMBED_CHUNK = 8


class Server(Edge):
    """The loaded model, its engine and scheduler, and the helpers the routes share."""

    def __init__(self, lm: LM, cfg: ServerConfig, draft: LM | None = None) -> None:
        self.engine = lm.configure_engine(max_batch=cfg.max_batch, max_len=cfg.ctx, kv_memory=cfg.kv_memory,
                                          draft_tokens=cfg.draft_tokens, draft_model=draft)
        super().__init__(lm, cfg, self.engine.context, self.engine.kv_limits_context)
        self.metrics = Metrics()
        self.scheduler = Scheduler(self.engine, max_queue=cfg.max_queue, metrics=self.metrics,
                                   stream_interval=cfg.stream_interval)
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}

    def token_text(self, i: int) -> str:
        text = self._token_text.get(i)
        if text is None:
            text = self._token_text[i] = self.tok.decode([i], skip_special_tokens=False)
        return text

    # -- work on the scheduler thread -----------------------------------------------------------------------
    def prompt_logprobs(self, ids: list[int], top: int) -> Generator[None, None, list[TokenLogprob | None]]:
        """Scoring of one prompt (`LM.score`), as a generator the scheduler runs a chunk per turn."""
        return self.lm.score_steps(ids, top)

    def score_prompts(self, prompts: list[list[int]], top: int
                      ) -> Generator[None, None, list[list[TokenLogprob | None]]]:
        out = []
        for ids in prompts:
            out.append((yield from self.prompt_logprobs(ids, top)))
        return out

    def embed(self, batch: list[list[int]]) -> Generator[None, None, list[torch.Tensor]]:
        """Vectors pooled as `LM.embed` pools them (an encoder's sentence-transformers config; mean otherwise);
        a generator run by the scheduler, EMBED_CHUNK inputs at a time."""
        vecs: list[torch.Tensor] = []
        for start in range(0, len(batch), EMBED_CHUNK):
            part = torch.from_numpy(self.lm.embed_ids(batch[start:start + EMBED_CHUNK]))
            vecs.extend(F.normalize(part, dim=-1))  # unit vectors, as OpenAI's embeddings are
            yield
        return vecs
