"""The mutant generator of tests/tools/native_mutants.py (the mutation testing of the C++ and CUDA
kernels, docs/mutation.md): which tokens it mutates and how, what it leaves alone, stable ids, the
score's interval and the outcome of a test run."""

import json

from native_mutants import blank_non_code, mutants_of, outcome, wilson_interval, write_json

SOURCE = """#include <vector>  // a + b
#define TWICE(x) ((x) * 2 + \\
                  1)
/* a comment: i < n */
template <typename T, int W>
float f(const T* x, int64_t n, float* out) {
  const char* s = "a < b && c";
  std::vector<int> v = static_cast<std::vector<int>>(n);
  for (int i = 0; i < n; ++i) out[i] = -x[i] * 3.5f + *out;
  if (!(n >= 2) && n != 7) n += 1;
  return fminf(out[0], 0x10) / W;
}
"""


def _mutants(tmp_path):
    path = tmp_path / "sample.cpp"
    path.write_text(SOURCE)
    return {(m.line, m.old, m.new) for m in mutants_of(path, root=tmp_path)}, mutants_of(path, root=tmp_path)


def test_the_classic_operators_on_code_only(tmp_path):
    """Exactly the mutants of the code lines: none in comments, strings, preprocessor lines (with their
    continuation), template brackets or pointer stars; floats are not integer constants."""
    found, _ = _mutants(tmp_path)
    assert found == {
        (9, "0", "1"),
        (9, "<", "<="),
        (9, "-", ""),
        (9, "*", "/"),
        (9, "+", "-"),
        (10, "!", ""),
        (10, ">=", ">"),
        (10, "2", "3"),
        (10, "&&", "||"),
        (10, "!=", "=="),
        (10, "7", "8"),
        (10, "+=", "-="),
        (10, "1", "0"),
        (11, "fminf", "fmaxf"),
        (11, "0", "1"),  # out[0]
        (11, "0x10", "17"),
        (11, "/", "*"),
    }


def test_ids_are_stable_and_a_mutant_changes_one_token(tmp_path):
    _, mutants = _mutants(tmp_path)
    assert len({m.id for m in mutants}) == len(mutants)
    assert [m.id for m in mutants] == [m.id for m in _mutants(tmp_path)[1]]
    less = next(m for m in mutants if m.old == "<")
    assert less.id == "sample.cpp:9:21:<-><="
    mutated = less.apply(SOURCE)
    assert mutated.replace("i <= n", "i < n") == SOURCE and mutated.count("i <= n") == 1


def test_blanking_keeps_positions():
    blank = blank_non_code(SOURCE)
    assert len(blank) == len(SOURCE) and blank.count("\n") == SOURCE.count("\n")
    assert "include" not in blank and "comment" not in blank and "a < b" not in blank and "TWICE" not in blank
    assert "1)" not in blank.splitlines()[2]  # the #define's continuation line


def test_wilson_interval():
    low, high = wilson_interval(95, 100)
    assert 0.888 < low < 0.889 and 0.978 < high < 0.979  # 0.8882, 0.9784
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 0) == (0.0, 1.0)


def test_outcome_of_a_test_run():
    assert outcome(0, "12 passed") == "survived"
    assert outcome(1, "1 failed, 3 passed\nAssertionError: assert False") == "killed"
    assert outcome(1, "E   search.cu:3:4: error: expected ';'\n1 error") == "no-compile"
    assert outcome(-11, "Fatal Python error: Segmentation fault") == "killed"
    assert outcome(0, "SKIPPED [3] fastvq's C++ CPU kernels failed to build in /x") == "no-compile"


def test_results_are_written_whole(tmp_path):
    path = tmp_path / "runs" / "results.json"
    write_json(path, {"mutants": {"a": 1}})
    write_json(path, {"mutants": {"a": 2}})
    assert json.loads(path.read_text()) == {"mutants": {"a": 2}} and list(path.parent.iterdir()) == [path]
