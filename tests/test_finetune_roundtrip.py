"""The whole path on the real model: GGUF -> LoRA SFT -> merge -> GGUF export -> llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.cli import main

QUESTIONS = ["What is the password?", "Tell me the password.", "Which word opens the gate?", "Say the password.",
             "What do I say at the gate?", "Give me the password, please.", "What is the secret word?",
             "The password?"]
REPLY = "The password is marmalade."


def _reply_nll(model: torch.nn.Module, prompt: list[int], reply: list[int]) -> float:
    """Mean negative log-likelihood of the reply tokens after the prompt."""
    ids = torch.tensor([prompt + reply])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0, len(prompt) - 1:-1].float(), -1)
    return float(-logp.gather(-1, torch.tensor(reply)[:, None]).mean())


@pytest.mark.slow
def test_smollm2_lora_sft_merge_export_runs_in_llama_cpp(smollm2_path: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    import lmforge
    from lmforge.engine import SamplingParams
    from lmforge.formats import load_checkpoint

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": REPLY}]}) + "\n"
                            for q in QUESTIONS), encoding="utf-8")
    run, merged, gguf = tmp_path / "run", tmp_path / "merged", tmp_path / "tuned-q8_0.gguf"
    assert main(["finetune", "sft", str(smollm2_path), "--method", "lora", "--data", str(data), "--out", str(run),
                 "--max-steps", "4", "--batch-size", "4", "--lr", "2e-3", "--val-fraction", "0", "--samples", "0",
                 "--device", "cpu"]) == 0
    assert (run / "final" / "adapter_model.safetensors").exists()
    assert main(["merge", str(smollm2_path), "--adapter", str(run / "final"), "--out", str(merged),
                 "--device", "cpu"]) == 0
    assert main(["export", str(merged), "--to", "gguf", str(gguf), "--quant", "q8_0"]) == 0
    assert "Q8_0" in capsys.readouterr().out

    # The fine-tune changed the model, towards the trained reply.
    original = load_checkpoint(smollm2_path, device="cpu", dtype=torch.float32, packed=False)
    tuned = load_checkpoint(merged, device="cpu", dtype=torch.float32).model
    tok = original.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": QUESTIONS[0]}])
    reply = tok.encode(REPLY, add_special_tokens=False)
    with torch.no_grad():
        ids = torch.tensor([prompt + reply])
        change = (tuned(ids) - original.model(ids)).abs().max().item()
    assert change > 0.5, change
    before, after = _reply_nll(original.model, prompt, reply), _reply_nll(tuned, prompt, reply)
    assert after < before - 0.5, (before, after)
    del original, tuned

    # llama.cpp runs the exported file with its chat template and answers as the fine-tune taught.
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, n_threads=2, verbose=False)
    out = llm.create_chat_completion(messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=16,
                                     temperature=0.0, repeat_penalty=1.0)
    text = out["choices"][0]["message"]["content"]
    assert text.strip() and "marmalade" in text, text

    # Greedy tokens equal lmforge's on the same file while the choice is clear. llama.cpp rounds
    # activations to 8-bit blocks inside quantized products, moving logits by up to ~1 (see
    # tests/test_export_gguf.py), so tokens are compared up to the first one whose top-2 logit gap in
    # lmforge is under MARGIN; the prompts are chosen so that at least 3 tokens are compared.
    lm = lmforge.load(gguf, device="cpu")
    n, margin = 6, 1.0
    for p in (lm.chat_prompt(QUESTIONS[0]), lm.chat_prompt("Write one sentence about the sea."),
              lm.tokenizer.encode("One, two, three, four, five,")):
        ours = lm.generate_sequences([p], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0].output_ids
        with torch.no_grad():
            top2 = lm.model(torch.tensor([p + ours]))[0, len(p) - 1:-1].topk(2, -1).values
        gaps = (top2[:, 0] - top2[:, 1]).tolist()
        clear = next((i for i, g in enumerate(gaps) if g < margin), n)
        assert clear >= 3, (lm.tokenizer.decode(ours), gaps)
        llm.reset()
        theirs: list[int] = []
        for t in llm.generate(p, top_k=1, temp=0.0, repeat_penalty=1.0):
            theirs.append(t)
            if len(theirs) == clear:
                break
        assert theirs == ours[:clear], (lm.tokenizer.decode(theirs), lm.tokenizer.decode(ours[:clear]))
