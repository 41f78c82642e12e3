"""Every CUDA C++ source of kernels/ compiles for sm_90 and sm_80 with warnings as errors, and no
kernel spills registers on sm_90 (no GPU needed: nvcc and ptxas report it)."""

import pytest
from cuda_compile import compile_all, nvcc_path, sources
from ptxas import SPILL_FREE

CAPABILITIES = (90, 80)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(nvcc_path() is None, reason="needs nvcc (CUDA_HOME, PATH or /usr/local/cuda)"),
]


@pytest.fixture(scope="module")
def compiled():
    return compile_all(CAPABILITIES)


def test_every_cuda_source_compiles(compiled):
    names = {p.name for p in sources()}
    assert {"nearest_code.cu", "code_stats.cu"} <= names
    for (source, capability), (code, output, entries) in compiled.items():
        assert code == 0, f"sm_{capability} {source} does not compile:\n{output[-3000:]}"
        assert entries, f"sm_{capability} {source}: ptxas reported no kernel"
        for name, registers, spills in entries:
            print(f"sm_{capability} {source} {name}: {registers} registers, {spills} B spilled")


def test_no_register_spills_where_the_kernels_are_tuned(compiled):
    spilling = [
        f"sm_{capability} {source} {name}: {spills} B"
        for (source, capability), (_, _, entries) in compiled.items()
        if capability in SPILL_FREE
        for name, _, spills in entries
        if spills
    ]
    assert not spilling, "\n".join(spilling)


def test_tensor_core_search_compiles_without_spills_for_every_variant(compiled):
    """The WMMA search (precision tf32 / bf16 / fp16, sm_80+) exists for every input dtype, operand
    type and list size on both capabilities, with no register spill on either."""
    for capability in CAPABILITIES:
        _, _, entries = compiled[("nearest_code.cu", capability)]
        variants = {name: spills for name, _, spills in entries if "tensor_core_search_kernel" in name}
        assert len(variants) == 3 * 3 * 5, f"sm_{capability}: {sorted(variants)}"
        for operand in ("Tf32Operand", "Bf16Operand", "Fp16Operand"):
            assert sum(operand in name for name in variants) == 3 * 5, f"sm_{capability}: {operand}"
        spilling = [name for name, spills in variants.items() if spills]
        assert not spilling, f"sm_{capability} spills in {spilling}"
