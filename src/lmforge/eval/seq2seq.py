"""Text-to-text tasks (translation, summarization): greedy outputs from the batched engine, scored against
the references with corpus BLEU and chrF (sacrebleu, on detokenized text) and ROUGE-1/2/L F-measures
(rouge-score, Porter stemming).

A decoder model is prompted with the spec's few-shot `context`; an encoder-decoder (T5) reads the spec's
task `prefix` followed by the source text, with no exemplars, as T5 was trained to."""

from __future__ import annotations

from typing import Any

from ..errors import LMForgeError
from ..tokenizer import Tokenizer
from .generate import drive
from .tasks import Item, TaskSpec, fewshot_prefix, sample_fewshot

ROUGE = ("rouge1", "rouge2", "rougeL")


def is_encoder_decoder(model: Any) -> bool:
    return getattr(model.cfg, "decoder_layers", 0) > 0


def overlap_scores(hypotheses: list[str], references: list[str], metrics: list[str], tokenize: str = "13a"
                   ) -> tuple[dict[str, float], dict[str, list[float]], dict[str, str]]:
    """(corpus value per metric, per-item values of the ROUGE metrics, sacrebleu signature per BLEU/chrF).

    BLEU and chrF are corpus-level (sacrebleu's defaults: BLEU-4 with exponential smoothing and the given
    tokenizer, chrF with character 6-grams and beta 2), on a 0-100 scale. ROUGE is the mean of the items'
    F-measures, on a 0-1 scale, as rouge-score gives them."""
    if len(hypotheses) != len(references):
        raise LMForgeError(f"{len(hypotheses)} outputs for {len(references)} references")
    values: dict[str, float] = {}
    per_item: dict[str, list[float]] = {}
    signatures: dict[str, str] = {}
    if "bleu" in metrics or "chrf" in metrics:
        from sacrebleu.metrics import BLEU, CHRF

        for name, metric in (("bleu", BLEU(tokenize=tokenize) if "bleu" in metrics else None),
                             ("chrf", CHRF() if "chrf" in metrics else None)):
            if metric is not None:
                values[name] = float(metric.corpus_score(hypotheses, [references]).score)
                signatures[name] = str(metric.get_signature())
    wanted = [m for m in ROUGE if m in metrics]
    if wanted:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(wanted, use_stemmer=True)
        per_item = {m: [] for m in wanted}
        for h, r in zip(hypotheses, references):
            got = scorer.score(r, h)  # (target, prediction)
            for m in wanted:
                per_item[m].append(float(got[m].fmeasure))
        for m in wanted:
            values[m] = sum(per_item[m]) / len(per_item[m]) if per_item[m] else 0.0
    return values, per_item, signatures


def prompts(lm: Any, spec: TaskSpec, items: list[Item], pool: list[Item], same: bool, shots: int, chat: bool,
            seed: int, room: int | None) -> list[list[int]]:
    """Each item's prompt ids: prefix + source for an encoder-decoder; the few-shot (or chat) prompt for a
    decoder, whose oldest exemplar text is cut to fit ``room`` tokens, never the item's own text."""
    from .runner import _chat_text

    tok: Tokenizer = lm.tokenizer
    if is_encoder_decoder(lm.model):
        return [tok.encode(spec.prefix + it.source) for it in items]
    out = []
    for it in items:
        ex = sample_fewshot(pool, shots, it.index, seed, same)
        if chat:
            ids, own = (tok.encode(_chat_text(tok, spec, e, it.contexts[0]), add_special_tokens=False)
                        for e in (ex, []))
        else:
            ids, own = tok.encode(fewshot_prefix(spec, ex) + it.contexts[0]), tok.encode(it.contexts[0])
        if room is not None and len(own) > room:
            raise LMForgeError(f"task {spec.name}: item {it.index}'s prompt is {len(own)} tokens, but the context "
                               f"leaves {room} beside max_tokens")
        out.append(ids[-room:] if room is not None else ids)
    return out


def cut_at_stop(text: str, stop: list[str] | tuple[str, ...]) -> str:
    """``text`` up to the first of the stop strings."""
    return min((text[:i] for i in (text.find(x) for x in stop if x) if i >= 0), key=len, default=text)


def search(engine: Any, ids: list[list[int]], params: Any, desc: str, batch: int, progress: bool) -> list[Any]:
    """Beam-search the sources ``batch`` at a time (each source's beams take a slot of their own)."""
    from tqdm import tqdm

    out: list[Any] = []
    with tqdm(total=len(ids), desc=desc, disable=not progress, unit="item") as bar:
        for i in range(0, len(ids), batch):
            out += engine.generate(ids[i:i + batch], params)
            bar.update(len(ids[i:i + batch]))
    return out


def run_seq2seq(lm: Any, spec: TaskSpec, items: list[Item], pool: list[Item], same: bool, shots: int,
                opt: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Generate every item's output and score the set; returns (metric rows, per-item samples, shots)."""
    from ..engine import Engine, SamplingParams

    seq2seq = is_encoder_decoder(lm.model)
    if seq2seq:
        if opt.chat:
            raise LMForgeError(f"task {spec.name}: an encoder-decoder model reads the task prefix and the source; "
                               "drop --chat")
        if opt.shots:
            raise LMForgeError(f"task {spec.name}: an encoder-decoder model is prompted without exemplars; "
                               "drop --shots")
        shots = 0
    beams = opt.num_beams
    if beams > 1 and not seq2seq:
        raise LMForgeError(f"task {spec.name}: --num-beams searches an encoder-decoder's outputs; "
                           f"{lm.config.family} is a decoder model")
    engine = Engine(lm.model, lm.tokenizer, max_batch=opt.batch_size)
    if seq2seq:  # the engine clamps the output to what the decoder holds
        max_tokens, room = spec.max_tokens, None
    else:  # a small context window keeps at least half of itself for the prompt
        max_tokens = max(1, min(spec.max_tokens, engine.context // 2))
        room = engine.context - max_tokens
    ids = prompts(lm, spec, items, pool, same, shots, opt.chat, opt.seed, room)
    if beams > 1:  # beam search ranks whole hypotheses, so the stop strings cut them afterwards
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, num_beams=beams)
        seqs = search(engine, ids, params, spec.name, opt.batch_size, opt.progress)
        for s in seqs:
            s.text = cut_at_stop(s.text, spec.stop)
    else:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=list(spec.stop))
        seqs = [engine.add(p, params) for p in ids]
        drive(engine, seqs, spec.name, opt.progress)
    for it, s in zip(items, seqs):
        if s.error is not None:
            raise LMForgeError(f"task {spec.name}: item {it.index}: generation failed ({s.error})")
    hyps = [s.text.strip() for s in seqs]
    refs = [str(it.gold) for it in items]
    values, per_item, sigs = overlap_scores(hyps, refs, spec.metrics, spec.tokenize)
    from .runner import mean_stderr

    rows = []
    for m in spec.metrics:
        row = {"task": spec.name, "metric": m, "value": values[m],
               "stderr": mean_stderr(per_item[m]) if m in per_item else None, "n": len(items), "shots": shots}
        if m in sigs:
            row["signature"] = sigs[m]
        rows.append(row)
    samples = []
    for k, (it, h) in enumerate(zip(items, hyps)):
        rec = {"index": it.index, "source": it.source, "prediction": h, "reference": refs[k]}
        rec.update({m: v[k] for m, v in per_item.items()})
        samples.append(rec)
    return rows, samples, shots
