"""The one build policy of fastvq's JIT-compiled extensions: the C++ CPU search (`fastvq.ops.cpu`) and
the CUDA backend (`fastvq.ops.cuda`), both built by `torch.utils.cpp_extension` with ninja at first use.

Cache: each build has its own folder under one root: $FASTVQ_CACHE_DIR, else $FASTVQ_CUDA_CACHE (its
    older name), else $XDG_CACHE_HOME/fastvq, else ~/.cache/fastvq. The folder is named after the
    extension, and the name carries what the binary depends on besides its sources and flags (Python,
    torch and CUDA versions, the CPU's vector unit, where torch is installed); ninja rebuilds only what
    changed.
Lock: a build holds an exclusive `fcntl.flock` on <folder>/build.lock from start to end, so other
    processes (and threads) building the same extension wait, then load what it built. The kernel
    frees that lock when a builder dies, however it dies; so torch's own lock file (<folder>/lock,
    which `cpp_extension` waits on for as long as it exists) can only be a leftover of a killed build
    while we hold ours, and is removed before building: it would make every later load wait forever.
Errors, one wording for both: "fastvq's <what> cannot be built: <cause and fix>. <alternative>" when
    a prerequisite is missing, "fastvq's <what> failed to build in <folder> (<the compiler's output,
    last lines>); fix the cause and delete <folder> to rebuild. <alternative>" when the build failed.
    Decided once per process: a failure is not retried per call.
Nothing here runs at import: `import fastvq` never compiles.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import re
import shutil
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

LOCK_FILE = "build.lock"
"""The file whose fcntl lock a build holds."""

TORCH_LOCK_FILE = "lock"
"""`torch.utils.cpp_extension`'s lock file (a `FileBaton`), waited on while it exists."""

_outcomes: dict[str, ModuleType | str] = {}  # extension name -> its module, or why it cannot be had
_guard = threading.Lock()


class JitBuildError(RuntimeError):
    """A JIT-built extension cannot be built or loaded here; the message says why and what to do."""


def cache_root() -> Path:
    """The folder that holds every build (see the module doc)."""
    root = os.environ.get("FASTVQ_CACHE_DIR") or os.environ.get("FASTVQ_CUDA_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "fastvq")


def extension_name(stem: str, cuda: bool = False) -> str:
    """fastvq_<stem>_py<X><Y>_torch<version>[_cu<version>]_<where torch is installed, hashed>, as a Python
    identifier. Two environments with the same versions build apart: the compiler's command names torch's
    headers by path, so one shared folder would be rebuilt at every switch between them."""
    name = f"fastvq_{stem}_py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__}"
    name += f"_cu{torch.version.cuda}" if cuda else ""
    return re.sub(r"\W", "_", f"{name}_{hashlib.sha1(str(Path(torch.__file__).parent).encode()).hexdigest()[:8]}")


def missing_sources(sources: tuple[Path, ...]) -> str:
    """Why the sources cannot be compiled ('' when every file is there)."""
    missing = [str(path) for path in sources if not path.is_file()]
    if not missing:
        return ""
    return (
        f"the sources are not installed with this copy of fastvq (missing: {', '.join(missing)}); reinstall "
        "fastvq (its wheel ships them as fastvq/kernels/) or install it from a source checkout (pip install -e .)"
    )


def missing_ninja() -> str:
    """Why ninja cannot run the build ('' when it can)."""
    from torch.utils import cpp_extension

    return "" if cpp_extension.is_ninja_available() else "ninja is not installed; install it with `pip install ninja`"


def missing_compiler() -> str:
    """Why the host C++ compiler ($CXX, default c++) cannot run ('' when it can)."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH); install g++ or clang, or set CXX"
    return ""


@dataclass(frozen=True)
class JitExtension:
    """One extension built at first use.

    name: module name, also its cache folder's name (`extension_name`). what: how messages name it
    ("C++ CPU kernels"). alternative: the sentence that ends every error (what to use instead).
    missing_prerequisite: why a build cannot start ('' when it can), checked before anything compiles.
    options: keyword arguments of `torch.utils.cpp_extension.load` (flags, include paths).
    prebuilt: a module built ahead of time (setup.py), imported instead when present.
    """

    name: str
    what: str
    alternative: str
    sources: tuple[Path, ...]
    missing_prerequisite: Callable[[], str]
    options: Mapping[str, object] = field(default_factory=dict)
    prebuilt: str = ""

    @property
    def folder(self) -> Path:
        return cache_root() / self.name

    def unavailable_reason(self, build: bool = True) -> str:
        """'' when the extension is loaded (a prebuilt one, or built first if `build` and needed), else
        why not and the fix. Without `build` nothing is compiled: the prerequisites (or an earlier outcome) answer."""
        with _guard:
            outcome = _outcomes.get(self.name) or self._prebuilt()
            if outcome is None:
                cause = self.missing_prerequisite()
                if cause:
                    outcome = f"fastvq's {self.what} cannot be built: {cause}. {self.alternative}"
                elif not build:
                    return ""
                else:
                    outcome = self._build()
            _outcomes[self.name] = outcome
        return outcome if isinstance(outcome, str) else ""

    def load(self) -> ModuleType:
        """The compiled module (built at the first call); JitBuildError naming the cause and the fix."""
        reason = self.unavailable_reason()
        if reason:
            raise JitBuildError(reason)
        return _outcomes[self.name]

    def _prebuilt(self) -> ModuleType | None:
        if not self.prebuilt:
            return None
        try:
            return importlib.import_module(self.prebuilt)
        except ImportError:
            return None

    def _build(self) -> ModuleType | str:
        """The built module, or the error text (see the module doc)."""
        from torch.utils import cpp_extension

        folder = self.folder
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with build_lock(folder):
                if not (folder / f"{self.name}.so").exists():  # later processes load it without a word
                    print(f"fastvq: compiling the {self.what} once into {folder} ...", file=sys.stderr, flush=True)
                return cpp_extension.load(
                    name=self.name,
                    sources=[str(path) for path in self.sources],
                    build_directory=str(folder),
                    verbose=False,
                    **self.options,
                )
        except Exception as err:  # a compiler or linker error, an unwritable cache, a broken library
            log = str(err).strip()
            return (
                f"fastvq's {self.what} failed to build in {folder} ({type(err).__name__}: {log[-1500:]}); "
                f"fix the cause and delete {folder} to rebuild. {self.alternative}"
            )


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """Hold the exclusive lock of a build in `folder` (waiting for another builder to finish), and
    remove torch's lock file, which only a killed build can have left while we hold ours."""
    import fcntl

    with open(folder / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (folder / TORCH_LOCK_FILE).unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
