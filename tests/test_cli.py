"""The `lmforge` command line: every bad input is one `lmforge: error: ...` line on stderr and exit code 1
(never a traceback), plus the happy paths of generate / info / list / chat on a tiny model."""

from __future__ import annotations

import builtins
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import make_tiny_llama_dir, write_tiny_gguf

import lmforge
from lmforge.chat import fit_conversation, run_chat
from lmforge.cli import main
from lmforge.engine import SamplingParams
from lmforge.errors import LMForgeError

CONTEXT = 64
KNOWN = ("smollm2-135m-instruct", "all-minilm-l6-v2")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Never touch (or pull into) the user's model cache."""
    home = tmp_path / "lmforge-home"
    monkeypatch.setenv("LMFORGE_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    model = make_tiny_llama_dir(d / "tiny", context=CONTEXT)
    gguf = write_tiny_gguf(d / "tiny.gguf", context=CONTEXT)
    data = gguf.read_bytes()
    (d / "truncated.gguf").write_bytes(data[: len(data) // 2])
    (d / "random.gguf").write_bytes(os.urandom(4096))
    bad = d / "bad-safetensors"
    shutil.copytree(model, bad)
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    return {"model": model, "gguf": gguf, "truncated": d / "truncated.gguf", "random": d / "random.gguf",
            "bad_st": bad}


@pytest.fixture(scope="module")
def lm(files: dict[str, Path]) -> lmforge.LM:
    return lmforge.load(files["model"], device="cpu")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_error(rc: int, err: str, *words: str) -> str:
    """Exit code 1 and exactly one `lmforge: error:` line naming the problem; returns the line."""
    assert rc == 1, err
    assert "Traceback" not in err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("lmforge: error: "), line
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"
    return line


# -- bad files and paths -------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["generate", "info"])
def test_truncated_gguf(capsys, files, cmd: str) -> None:
    path = files["truncated"]
    rc, out, err = run(capsys, cmd, path, *(["hello"] if cmd == "generate" else []))
    line = assert_error(rc, err, str(path))
    assert re.search(r"not a valid GGUF|truncated", line)
    assert out == ""


@pytest.mark.parametrize("cmd", ["generate", "info"])
def test_random_bytes_gguf(capsys, files, cmd: str) -> None:
    path = files["random"]
    rc, _, err = run(capsys, cmd, path, *(["hello"] if cmd == "generate" else []))
    assert_error(rc, err, str(path), "not a valid GGUF")


def test_truncated_safetensors_generate(capsys, files) -> None:
    rc, _, err = run(capsys, "generate", files["bad_st"], "hello")
    line = assert_error(rc, err, str(files["bad_st"] / "model.safetensors"))
    assert re.search(r"not a valid safetensors|truncated", line)



def test_truncated_safetensors_info(capsys, files) -> None:
    rc, _, err = run(capsys, "info", files["bad_st"])
    assert_error(rc, err, "model.safetensors")


@pytest.mark.parametrize("cmd", ["generate", "info", "chat"])
@pytest.mark.parametrize("path", ["/no/such/model.gguf", "./missing_dir/"])
def test_nonexistent_path(capsys, cmd: str, path: str) -> None:
    rc, _, err = run(capsys, cmd, path, *(["hello"] if cmd == "generate" else []))
    assert_error(rc, err, "no such file or directory", path)


def test_not_a_model(capsys, tmp_path: Path) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("hi")
    rc, _, err = run(capsys, "generate", txt, "hello")
    assert_error(rc, err, str(txt), "not a .gguf file or a model directory")
    rc, _, err = run(capsys, "info", tmp_path)  # a directory without config.json
    assert_error(rc, err, "no config.json")


@pytest.mark.parametrize("cmd", ["generate", "info", "chat"])
def test_unknown_model_name(capsys, cmd: str, _isolated_home: Path) -> None:
    rc, _, err = run(capsys, cmd, "gpt-17-ultra", *(["hello"] if cmd == "generate" else []))
    assert_error(rc, err, "unknown model 'gpt-17-ultra'", *KNOWN)
    assert not _isolated_home.exists() or not any(_isolated_home.rglob("*"))  # nothing was pulled


# -- bad prompts and options ------------------------------------------------------------------------------
def test_prompt_longer_than_the_context(capsys, files, lm) -> None:
    prompt = "The cat sat on the mat, then the cat ate the fish. " * 13
    n = len(lm.tokenizer.encode(prompt))
    assert n > 3 * CONTEXT
    rc, out, err = run(capsys, "generate", files["model"], prompt, "--max-tokens", "5")
    assert_error(rc, err, f"prompt is {n} tokens, but the context window is {CONTEXT} tokens")
    assert out == ""


def test_chat_prompt_longer_than_the_context(capsys, files, lm, monkeypatch) -> None:
    text = "Hello world! This is a tiny tokenizer for tests. " * 10
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    rc, _, err = run(capsys, "chat", files["model"], "--max-tokens", "5")
    n = len(lm.chat_prompt(text.strip()))
    assert_error(rc, err, f"prompt is {n} tokens, but the context window is {CONTEXT} tokens")


def test_empty_prompt(capsys, files, monkeypatch) -> None:
    rc, _, err = run(capsys, "generate", files["model"], "")
    assert_error(rc, err, "prompt is empty")
    monkeypatch.setattr(sys, "stdin", io.StringIO("   \n"))
    rc, _, err = run(capsys, "chat", files["model"])
    assert_error(rc, err, "no input on stdin")


@pytest.mark.parametrize("flag,value,words", [
    ("--top-p", "3", ("top_p", "3.0")),
    ("--temperature", "-1", ("temperature", "-1.0")),
    ("--max-tokens", "0", ("max_tokens", "0")),
    ("--top-k", "-5", ("top_k", "-5")),
    ("--min-p", "2", ("min_p", "2.0")),
    ("--repetition-penalty", "0", ("repetition_penalty",)),
    ("--presence-penalty", "5", ("presence_penalty",)),
    ("--top-logprobs", "50", ("top_logprobs", "50")),
    ("--logit-bias", "abc", ("--logit-bias", "TOKEN_ID=BIAS", "'abc'")),
    ("--logit-bias", "5", ("--logit-bias", "'5'")),
    ("--logit-bias", "5=lots", ("--logit-bias", "'5=lots'")),
    ("--logit-bias", "5=500", ("logit_bias", "token 5", "500")),
])
def test_nonsense_sampling_values(capsys, files, flag: str, value: str, words: tuple[str, ...]) -> None:
    rc, out, err = run(capsys, "generate", files["model"], "hello", flag, value)
    assert_error(rc, err, *words)
    assert out == ""


@pytest.mark.parametrize("flag,value", [("--top-p", "3"), ("--temperature", "-1"), ("--min-p", "2")])
def test_nonsense_sampling_values_in_chat(capsys, files, monkeypatch, flag: str, value: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello"))
    rc, _, err = run(capsys, "chat", files["model"], flag, value)
    assert_error(rc, err, flag.lstrip("-").replace("-", "_"))



def test_logit_bias_outside_the_vocabulary(capsys, files) -> None:
    rc, _, err = run(capsys, "generate", files["model"], "hello", "--logit-bias", "99999=5", "--max-tokens", "2")
    assert_error(rc, err, "99999")



def test_bad_device(capsys, files) -> None:
    rc, _, err = run(capsys, "generate", files["model"], "hello", "--device", "gpu0")
    assert_error(rc, err, "gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(capsys, files) -> None:
    rc, _, err = run(capsys, "generate", files["model"], "hello", "--device", "cuda")
    assert_error(rc, err, "cuda")


# -- real processes ---------------------------------------------------------------------------------------
def _proc(args: list[str], home: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LMFORGE_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(args, capture_output=True, text=True, input=stdin, env=env, timeout=120,
                          encoding="utf-8", errors="replace")


def test_subprocess_missing_file(_isolated_home: Path) -> None:
    p = _proc([sys.executable, "-m", "lmforge.cli", "generate", "/no/such/model.gguf", "hello"], _isolated_home)
    assert p.returncode == 1
    assert p.stdout == ""
    assert "Traceback" not in p.stderr
    assert p.stderr.splitlines() == ["lmforge: error: no such file or directory: /no/such/model.gguf"]


def test_subprocess_console_script_truncated_gguf(files, _isolated_home: Path) -> None:
    script = Path(sys.executable).with_name("lmforge")
    if not script.exists():
        pytest.skip("no lmforge console script next to the interpreter")
    p = _proc([str(script), "info", str(files["truncated"])], _isolated_home)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lmforge: error: {files['truncated']}: not a valid GGUF")


def test_subprocess_piped_chat(files, lm, _isolated_home: Path) -> None:
    p = _proc([sys.executable, "-m", "lmforge.cli", "chat", str(files["model"]), "--temperature", "0",
               "--max-tokens", "6"], _isolated_home, stdin="hello\n")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stdout == lm.chat("hello", temperature=0.0, max_tokens=6) + "\n"


# -- happy paths: generate ---------------------------------------------------------------------------------
PROMPT = "The quick brown fox"


def test_generate_greedy(capsys, files, lm) -> None:
    expected = lm.generate(PROMPT, temperature=0.0, max_tokens=5)
    assert expected.strip()
    rc, out, err = run(capsys, "generate", files["model"], PROMPT, "--temperature", "0", "--max-tokens", "5")
    assert rc == 0, err
    assert out == expected + "\n"
    assert err == ""


def test_generate_reads_the_prompt_from_stdin(capsys, files, lm, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT))
    rc, out, _ = run(capsys, "generate", files["model"], "--temperature", "0", "--max-tokens", "5")
    assert rc == 0
    assert out == lm.generate(PROMPT, temperature=0.0, max_tokens=5) + "\n"


def test_generate_stream(capsys, files, lm) -> None:
    args = ("generate", files["model"], PROMPT, "--temperature", "0", "--max-tokens", "12", "--ignore-eos")
    rc, plain, _ = run(capsys, *args)
    assert rc == 0
    rc, streamed, _ = run(capsys, *args, "--stream")
    assert rc == 0
    assert streamed == plain == lm.generate(PROMPT, temperature=0.0, max_tokens=12, ignore_eos=True) + "\n"


def test_generate_stop(capsys, files, lm) -> None:
    full = lm.generate(PROMPT, temperature=0.0, max_tokens=16, ignore_eos=True)
    k = max(1, len(full) // 2)
    stop = full[k:k + 2]
    cut = full[: full.find(stop)]
    assert len(cut) < len(full)
    for extra in ((), ("--stream",)):
        rc, out, _ = run(capsys, "generate", files["model"], PROMPT, "--temperature", "0", "--max-tokens", "16",
                         "--ignore-eos", "--stop", stop, *extra)
        assert rc == 0
        assert out == cut + "\n"
        assert stop not in out


def test_generate_seed_is_reproducible(capsys, files) -> None:
    args = ("generate", files["model"], PROMPT, "--temperature", "1.5", "--max-tokens", "12", "--ignore-eos")
    outs = [run(capsys, *args, "--seed", s)[1] for s in ("3", "3", "4")]
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def test_generate_logprobs(capsys, files) -> None:
    rc, out, err = run(capsys, "generate", files["model"], PROMPT, "--temperature", "0", "--max-tokens", "5",
                       "--ignore-eos", "--logprobs", "--top-logprobs", "2")
    assert rc == 0
    lines = err.splitlines()
    assert len(lines) == 5  # one per generated token
    for line in lines:
        token, lp, alts = line.split("\t")
        assert float(lp) <= 0.0
        assert alts.count(":") >= 2


# -- happy paths: info, list ---------------------------------------------------------------------------------
def test_info_hf_dir(capsys, files, lm) -> None:
    rc, out, err = run(capsys, "info", files["model"])
    assert rc == 0, err
    fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    assert fields["architecture"] == "llama"
    assert fields["format"] == "hf"
    assert f"({lm.model.num_params():,})" in fields["parameters"]
    assert fields["context length"] == str(CONTEXT)
    assert fields["vocab size"] == str(lm.config.vocab_size)
    assert fields["chat template"].endswith("(show it with --template)")
    rc, out, _ = run(capsys, "info", files["model"], "--template")
    assert rc == 0
    assert lm.tokenizer.chat_template in out


def test_info_gguf(capsys, files) -> None:
    rc, out, err = run(capsys, "info", files["gguf"])
    assert rc == 0, err
    fields = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    assert fields["architecture"] == "llama" and fields["format"] == "gguf"
    assert fields["context length"] == str(CONTEXT)
    assert re.fullmatch(r"\S+ \([\d,]+\)", fields["parameters"])
    assert fields["tokenizer"].startswith("gpt2 (pre: gpt-2)")


def test_list_all(capsys, _isolated_home: Path) -> None:
    rc, out, _ = run(capsys, "list", "--all")
    assert rc == 0
    for name in KNOWN:
        line = next(ln for ln in out.splitlines() if ln.startswith(name))
        assert "available" in line
    rc, out, _ = run(capsys, "list")
    assert rc == 0
    assert not any(name in out for name in KNOWN)
    assert "no models pulled yet" in out


def test_no_command_prints_help(capsys) -> None:
    rc, out, _ = run(capsys)
    assert rc == 2 and "usage: lmforge" in out


# -- chat -----------------------------------------------------------------------------------------------------
def test_chat_piped_stdin(capsys, files, lm, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n"))
    rc, out, err = run(capsys, "chat", files["model"], "--temperature", "0", "--max-tokens", "6",
                       "--system", "be brief")
    assert rc == 0, err
    expected = lm.chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}],
                       temperature=0.0, max_tokens=6)
    assert out == expected + "\n"
    assert ">>>" not in out and "Chatting with" not in err  # non-interactive: no banner, no prompt


def _feed(monkeypatch: pytest.MonkeyPatch, lines: list[str]) -> None:
    it = iter(lines)

    def fake_input(prompt: str = "") -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)


def _spy(monkeypatch: pytest.MonkeyPatch, lm: lmforge.LM) -> list[list[dict]]:
    seen: list[list[dict]] = []
    real = lm.chat_prompt

    def spy(messages, tools=None):
        seen.append(messages if isinstance(messages, str) else [dict(m) for m in messages])
        return real(messages, tools)

    monkeypatch.setattr(lm, "chat_prompt", spy)
    return seen


def test_chat_repl_commands(capsys, lm, monkeypatch) -> None:
    _feed(monkeypatch, ["hello", "/system be brief", "/reset", "hi", "/exit", "never read"])
    seen = _spy(monkeypatch, lm)
    params = SamplingParams(temperature=0.0, max_tokens=4)
    capsys.readouterr()
    assert run_chat(lm, params, interactive=True) == 0
    out, err = capsys.readouterr()
    assert "Chatting with" in err and "context 64 tokens" in err
    assert "[system prompt set]" in err and "[conversation cleared]" in err
    convs = list(seen)  # one encode per answer (nothing overflows)
    assert convs[0] == [{"role": "user", "content": "hello"}]
    # /system replaced the system prompt, /reset dropped the turns but kept the system prompt.
    assert convs[-1] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert len(convs) == 2
    first = lm.chat("hello", temperature=0.0, max_tokens=4)
    assert out.startswith(first + "\n")


def test_chat_repl_keeps_history_and_handles_errors(capsys, lm, monkeypatch) -> None:
    huge = "The cat sat on the mat. " * 40
    _feed(monkeypatch, ["", "/nonsense", huge, "hi", "again"])  # ends with EOF
    seen = _spy(monkeypatch, lm)
    capsys.readouterr()
    assert run_chat(lm, SamplingParams(temperature=0.0, max_tokens=3), system="S", interactive=True) == 0
    _, err = capsys.readouterr()
    assert "unknown command /nonsense" in err
    assert re.search(r"lmforge: error: prompt is \d+ tokens, but the context window is 64 tokens", err)
    # The overlong message was dropped; the next turns carry the history.
    assert seen[-1][0] == {"role": "system", "content": "S"}
    assert [m["role"] for m in seen[-1]] == ["system", "user", "assistant", "user"]
    assert seen[-1][1]["content"] == "hi" and seen[-1][3]["content"] == "again"
    assert all(huge not in m["content"] for m in seen[-1])


def test_chat_repl_drops_oldest_turns_with_a_notice(capsys, lm, monkeypatch) -> None:
    turn = "Hello world! This is a tiny tokenizer."
    _feed(monkeypatch, [f"{turn} {i}" for i in range(6)])
    seen = _spy(monkeypatch, lm)
    capsys.readouterr()
    assert run_chat(lm, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), system="S",
                    interactive=True) == 0
    _, err = capsys.readouterr()
    assert re.search(r"\[context full: dropped the \d+ oldest message\(s\)\]", err)
    last = seen[-1]
    assert last[0] == {"role": "system", "content": "S"}
    assert last[-1] == {"role": "user", "content": f"{turn} 5"}
    assert len(lm.chat_prompt(last)) + 8 <= CONTEXT


def test_fit_conversation(lm) -> None:
    msgs = [{"role": "system", "content": "S"}]
    for i in range(5):
        msgs += [{"role": "user", "content": f"Hello world number {i}"},
                 {"role": "assistant", "content": f"The cat sat on the mat {i}"}]
    msgs.append({"role": "user", "content": "newest question"})
    original = list(msgs)
    full = len(lm.chat_prompt(msgs))
    assert full > CONTEXT
    ids, dropped = fit_conversation(lm, msgs, reserve=16)
    assert dropped > 0
    assert len(ids) + 16 <= CONTEXT
    assert msgs == [original[0]] + original[1 + dropped:]  # oldest turns went first, system kept
    assert msgs[-1] == {"role": "user", "content": "newest question"}
    assert ids == lm.chat_prompt(msgs)
    # One fewer drop would not have fit.
    assert len(lm.chat_prompt([original[0]] + original[dropped:])) + 16 > CONTEXT
    # Nothing to drop when it fits.
    short = [{"role": "user", "content": "hi"}]
    ids, dropped = fit_conversation(lm, short, reserve=16)
    assert dropped == 0 and short == [{"role": "user", "content": "hi"}]


def test_fit_conversation_lone_message_too_long(lm) -> None:
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "The cat sat on the mat. " * 20}]
    with pytest.raises(LMForgeError, match=r"prompt is \d+ tokens, but the context window is 64 tokens"):
        fit_conversation(lm, msgs, reserve=4)
