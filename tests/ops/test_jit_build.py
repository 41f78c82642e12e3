"""The one JIT build policy (`fastvq.ops.jit`) of the C++ CPU search and the CUDA backend: the cache
folder, the build lock (a build killed mid-way leaves nothing that makes later loads wait), one
wording of errors, decided once per process."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastvq.ops import backend, jit
from fastvq.ops.cpu import _extension
from fastvq.ops.cuda import _build

TINY_SOURCE = """
#include <pybind11/pybind11.h>
int answer() { return 42; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""

needs_toolchain = pytest.mark.skipif(
    bool(jit.missing_compiler() or jit.missing_ninja()), reason=jit.missing_compiler() or jit.missing_ninja() or ""
)


@pytest.fixture
def fresh_outcomes(monkeypatch, tmp_path):
    """An empty record of what this process built, and a cache root of the test's own."""
    monkeypatch.setattr(jit, "_outcomes", {})
    monkeypatch.setenv("FASTVQ_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _extension_code(name: str, source) -> str:
    return textwrap.dedent(f"""
        from pathlib import Path
        from fastvq.ops import jit
        extension = jit.JitExtension(name={name!r}, what="test kernels", alternative="Use the other path.",
                                     sources=(Path({str(source)!r}),), missing_prerequisite=lambda: "")
        """)


def _python(code: str, cache, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTVQ_CACHE_DIR"] = str(cache)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


def test_cache_folder_and_names(monkeypatch, tmp_path):
    """One root for both builds ($FASTVQ_CACHE_DIR, else the older $FASTVQ_CUDA_CACHE, else
    $XDG_CACHE_HOME/fastvq), one folder per extension named by what the binary depends on (down to
    where torch is installed)."""
    for variable in ("FASTVQ_CACHE_DIR", "FASTVQ_CUDA_CACHE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert jit.cache_root() == tmp_path / "xdg" / "fastvq"
    monkeypatch.setenv("FASTVQ_CUDA_CACHE", str(tmp_path / "old"))
    assert jit.cache_root() == tmp_path / "old"
    monkeypatch.setenv("FASTVQ_CACHE_DIR", str(tmp_path / "new"))
    assert jit.cache_root() == tmp_path / "new"
    python = f"py{sys.version_info[0]}{sys.version_info[1]}"
    cpu_build = _extension.extension("AVX2")
    assert cpu_build.name.startswith(f"fastvq_cpu_search_avx2_{python}_torch") and cpu_build.name.isidentifier()
    assert cpu_build.folder == tmp_path / "new" / cpu_build.name
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert "_cu13_0_" in jit.extension_name("cuda", cuda=True)
    monkeypatch.setattr(torch, "__file__", "/another/environment/torch/__init__.py")
    assert jit.extension_name("cpu_search_avx2") != cpu_build.name, "another torch installation builds apart"
    assert _build.extension().folder.parent == tmp_path / "new"


def test_cuda_build_prerequisites_name_the_fix(monkeypatch, tmp_path):
    """Each missing piece of the CUDA build gives its own cause and fix, before anything compiles."""
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", None)
    reason = _build.missing_prerequisite()
    assert "this torch build" in reason and "install a CUDA build of torch" in reason
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    reason = _build.missing_prerequisite()
    assert "nvcc was not found" in reason and "CUDA_HOME" in reason and "FASTVQ_FORCE_BUILD=1" in reason
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    assert _build.missing_prerequisite() == "ninja is not installed; install it with `pip install ninja`"
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    assert _build.missing_prerequisite() == ""
    (tmp_path / "a.cu").write_text("")
    monkeypatch.setattr(_build, "KERNELS_DIR", tmp_path)
    reason = _build.missing_prerequisite()
    assert reason.startswith("the sources are not installed with this copy of fastvq") and "torch_glue.cpp" in reason


def test_both_extensions_word_their_errors_alike(monkeypatch, fresh_outcomes):
    """The CPU build without a compiler and the CUDA build without a CUDA torch: "fastvq's <what> cannot
    be built: <cause and fix>. <what to use instead>", the same through the backends' records."""
    monkeypatch.setenv("CXX", "no-such-compiler-fastvq")
    monkeypatch.setattr(torch.version, "cuda", None)
    cpu_reason = _extension.extension("DEFAULT").unavailable_reason()
    assert cpu_reason == (
        "fastvq's C++ CPU kernels cannot be built: no C++ compiler ('no-such-compiler-fastvq' is "
        "not on PATH); install g++ or clang, or set CXX. Use backend='torch' (or "
        "FASTVQ_BACKEND=torch) to run the plain-PyTorch path."
    )
    cuda_reason = backend.REGISTRY["cuda"].why_not(torch.device("cuda"), False)
    assert cuda_reason.startswith("fastvq's CUDA kernels cannot be built: this torch build")
    assert cuda_reason.endswith(". Use backend='triton' (the fused Triton kernels) or backend='torch'.")


@needs_toolchain
def test_a_failed_build_is_reported_once_with_the_compiler_output(monkeypatch, fresh_outcomes, tmp_path):
    """A compiler error: the reason names the folder to delete, quotes the compiler and is not retried
    per call; load() raises it."""
    from torch.utils import cpp_extension

    source = tmp_path / "broken.cpp"
    source.write_text("int main() { return undeclared_name_fastvq; }\n")
    extension = jit.JitExtension(
        name="fastvq_jit_broken_test",
        what="test kernels",
        alternative="Use the other path.",
        sources=(source,),
        missing_prerequisite=lambda: "",
    )
    builds = []
    real_load = cpp_extension.load
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: builds.append(kwargs) or real_load(**kwargs))
    reason = extension.unavailable_reason()
    assert reason.startswith(f"fastvq's test kernels failed to build in {extension.folder} (RuntimeError: ")
    assert "undeclared_name_fastvq" in reason
    assert reason.endswith(f"); fix the cause and delete {extension.folder} to rebuild. Use the other path.")
    with pytest.raises(jit.JitBuildError) as raised:
        extension.load()
    assert str(raised.value) == reason
    assert extension.unavailable_reason(build=False) == reason and len(builds) == 1


@pytest.mark.slow
@needs_toolchain
def test_a_build_killed_midway_leaves_no_lock_that_blocks_later_loads(tmp_path):
    """A builder killed inside torch's build step (after torch created its lock file) leaves that file;
    torch alone would wait on it for ever, the policy's lock shows it stale and the next load builds."""
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY_SOURCE)
    cache, name = tmp_path / "cache", "fastvq_jit_lock_test"
    killed = _python(
        _extension_code(name, source)
        + textwrap.dedent("""
        import os, signal
        from torch.utils import cpp_extension
        def die(*args, **kwargs):  # a build killed while ninja runs
            os.kill(os.getpid(), signal.SIGKILL)
        cpp_extension._write_ninja_file_and_build_library = die
        extension.load()
        """),
        cache,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    folder = cache / name
    assert (folder / jit.TORCH_LOCK_FILE).exists(), "the killed build must leave torch's lock file"
    with pytest.raises(subprocess.TimeoutExpired) as waited:  # torch on its own waits on the leftover
        _python(
            f"from torch.utils import cpp_extension\nprint('loading', flush=True)\ncpp_extension.load("
            f"name={name!r}, sources=[{str(source)!r}], build_directory={str(folder)!r})",
            cache,
            timeout=30,
        )
    assert b"loading" in waited.value.stdout, "torch must have been waiting, not still importing"
    loaded = _python(_extension_code(name, source) + "print(extension.load().answer())", cache, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split() == ["42"] and not (folder / jit.TORCH_LOCK_FILE).exists()


@pytest.mark.slow
@needs_toolchain
def test_concurrent_builders_wait_for_one_another(tmp_path):
    """Two processes of three threads each load one extension at once: every thread gets it, each process
    runs torch's build step once, and the compiler runs once (the other process waited on the lock, then
    found the library built: it says nothing)."""
    source = tmp_path / "tiny.cpp"
    source.write_text(TINY_SOURCE)
    cache, name = tmp_path / "cache", "fastvq_jit_race_test"
    code = _extension_code(name, source) + textwrap.dedent("""
        import threading
        from torch.utils import cpp_extension
        real_build, builds = cpp_extension._write_ninja_file_and_build_library, []
        def counted(*args, **kwargs):
            builds.append(1)
            return real_build(*args, **kwargs)
        cpp_extension._write_ninja_file_and_build_library = counted
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(extension.load().answer())) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(answers, len(builds))
        """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTVQ_CACHE_DIR"] = str(cache)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    assert all(process.returncode == 0 for process in processes), [err[-2000:] for _, err in outputs]
    assert [out.strip() for out, _ in outputs] == ["[42, 42, 42] 1"] * 2
    assert "".join(err for _, err in outputs).count("fastvq: compiling the test kernels") == 1
