"""Compile fastvq's Triton kernels for real NVIDIA GPUs without one (triton ships ptxas).

The interpreter accepts programs a GPU rejects (tl.dot with an inner dimension below 16, dtype
mismatches), so CI also lowers every kernel, with the launch configurations the launchers pick,
to a cubin for Hopper (sm_90) and Ampere (sm_80), and reads each variant's registers and spills
from ptxas. Run as a script, without TRITON_INTERPRET:

    python tests/tools/gpu_compile.py [CAPABILITY ...]      # default: 90 80

prints one line per compiled variant (shared memory, registers, spill bytes) and exits non-zero on
the first failure, or at the end when a variant spills registers to local memory on a GPU the
project runs on (sm_90: H100, H200; the tiles are tuned there, Ampere's spills are only reported).
"""

import importlib
import itertools
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from ptxas import SPILL_FREE, usage
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from fastvq.ops.triton._launch import distance_config, grad_config, search_config
from fastvq.ops.triton._tiles import dot_options

TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
CONFIG_DEVICE = torch.device("cpu")  # tile sizes do not depend on it; a CUDA device would need a GPU to query


def _signature(names, pointers, ints, constexprs):
    sig = {}
    for name in names:
        if name in pointers:
            sig[name] = "*" + pointers[name]
        elif name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = ints.get(name, "i64")
    return sig


def search_variants():
    """The search kernel: nearest_code at every shape and precision; topk_codes (TOPK > 1) and
    sample_code (GUMBEL) at two shapes, fp32 and bf16."""
    module = importlib.import_module("fastvq.ops.triton.nearest_code")
    kernel = module._search_kernel
    shapes = [(65536, 1024, 64), (1024, 262144, 32), (262144, 16384, 8), (4096, 4096, 1000), (301, 259, 3)]
    precisions = itertools.product(shapes, TORCH_TO_TRITON, ["ieee", "tf32", "bf16", "fp16"])
    cases = [
        (shape, dtype, precision, False, 1)
        for shape, dtype, precision in precisions
        if dtype == torch.float32 or precision != "tf32"
    ]
    cases += [
        (shape, dtype, precision, gumbel, topk)
        for shape in [(65536, 1024, 64), (4096, 4096, 1000)]
        for dtype, precision in [(torch.float32, "tf32"), (torch.bfloat16, "bf16")]
        for gumbel, topk in [(False, 16), (True, 1), (True, 4)]
    ]
    for (n, k, d), dtype, precision, gumbel, topk in cases:
        config = search_config(n, k, d, 1, precision, CONFIG_DEVICE, topk, logits=gumbel)
        options = {"num_warps": config.pop("num_warps"), "num_stages": config.pop("num_stages")}
        config.pop("splits"), config.pop("codes_per_split")
        metric = "cosine" if precision == "ieee" else "dot" if gumbel and precision == "bf16" else "l2"
        constexprs = dict(
            METRIC=metric,
            GUMBEL=gumbel,
            TOPK=topk,
            KPAD=triton.next_power_of_2(topk),
            **dot_options(precision),
            **config,
        )
        t = TORCH_TO_TRITON[dtype]
        pointers = dict(x_ptr=t, code_ptr=t, bias_ptr="fp32", best_score_ptr="fp32", best_index_ptr="i64")
        ints = dict(N="i32", K="i32", D="i32", codes_per_split="i32", logit_scale="fp32", noise_scale="fp32")
        yield (
            f"search {n}x{k}x{d} {t} {precision} {metric} gumbel={gumbel} topk={topk}",
            kernel,
            pointers,
            ints,
            constexprs,
            options,
        )
    kernel = module._chosen_distance_kernel
    for d, metric in itertools.product([3, 64, 1000], ["l2", "cosine", "dot"]):
        pointers = dict(x_ptr="bf16", code_ptr="fp32", index_ptr="i64", dist_ptr="fp32")
        config = distance_config(d)
        options = {"num_warps": config.pop("num_warps")}
        ints = dict(N="i32", D="i32", J="i32")
        yield f"chosen_distance D={d} {metric}", kernel, pointers, ints, dict(METRIC=metric, **config), options


def code_cross_entropy_variants():
    module = importlib.import_module("fastvq.ops.triton.code_cross_entropy")
    shapes = [(65536, 1024, 64), (1024, 16384, 256)]
    dtypes = [(torch.float32, "tf32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")]
    ints = dict(N="i32", K="i32", D="i32", codes_per_split="i32", per_split="i32")
    for (n, k, d), (dtype, precision) in itertools.product(shapes, dtypes):
        t = TORCH_TO_TRITON[dtype]
        config = search_config(n, k, d, 1, precision, CONFIG_DEVICE, logits=True)
        options = {"num_warps": config.pop("num_warps"), "num_stages": config.pop("num_stages")}
        config.pop("splits"), config.pop("codes_per_split")
        metric = {"tf32": "l2", "bf16": "cosine", "fp16": "dot"}[precision]
        constexprs = dict(METRIC=metric, **dot_options(precision), **config)
        pointers = dict(
            x_ptr=t, code_ptr=t, bias_ptr="fp32", index_ptr="i64", max_ptr="fp32", sum_ptr="fp32", target_ptr="fp32"
        )
        yield (
            f"code_cross_entropy forward {n}x{k}x{d} {t} {precision} {metric}",
            module._ce_forward_kernel,
            pointers,
            ints,
            constexprs,
            options,
        )
        for code_side in (False, True):
            rows, stream = (k, n) if code_side else (n, k)
            config = grad_config(rows, stream, d, 1, CONFIG_DEVICE, code_side)
            options = {"num_warps": config.pop("num_warps"), "num_stages": config.pop("num_stages")}
            config.pop("splits"), config.pop("per_split")
            metric = {"tf32": "cosine", "bf16": "l2", "fp16": "dot"}[precision]
            constexprs = dict(
                CODE_SIDE=code_side, METRIC=metric, GRAD_PRECISION="tf32", **dot_options(precision), **config
            )
            pointers = dict(
                x_ptr=t, code_ptr=t, bias_ptr="fp32", index_ptr="i64", lse_ptr="fp32", grad_ptr="fp32", out_ptr="fp32"
            )
            yield (
                f"code_cross_entropy grad code_side={code_side} {n}x{k}x{d} {t} {precision} {metric}",
                module._ce_grad_kernel,
                pointers,
                ints,
                constexprs,
                options,
            )


def code_stats_variants():
    """The deterministic sorted reduction (chunk sums, run sums) at its largest blocks, and the atomic variant."""
    module = importlib.import_module("fastvq.ops.triton.code_stats")
    for t in ["fp32", "bf16"]:
        pointers = dict(x_ptr=t, order_ptr="i64", chunk_start_ptr="i64", chunk_len_ptr="i64", partial_ptr="fp32")
        yield (
            f"code_stats chunk sums {t}",
            module._chunk_sums_kernel,
            pointers,
            dict(n_chunks="i32", N="i32", D="i32"),
            dict(BLOCK_C=32, BLOCK_D=64),
            {"num_warps": 4},
        )
    pointers = dict(
        partial_ptr="fp32", run_first_chunk_ptr="i64", run_chunks_ptr="i64", run_key_ptr="i64", sums_ptr="fp32"
    )
    yield (
        "code_stats run sums",
        module._run_sums_kernel,
        pointers,
        dict(n_runs="i32", D="i32"),
        dict(BLOCK_R=32, BLOCK_D=64),
        {"num_warps": 4},
    )
    for has_mask, t in itertools.product([False, True], ["fp32", "bf16"]):
        pointers = dict(x_ptr=t, index_ptr="i64", mask_ptr="u8", counts_ptr="fp32", sums_ptr="fp32")
        constexprs = dict(HAS_MASK=has_mask, BLOCK_N=128, BLOCK_D=64)
        yield (
            f"code_stats atomic {t} mask={has_mask}",
            module._atomic_code_stats_kernel,
            pointers,
            dict(N="i32", K="i32", D="i32"),
            constexprs,
            {"num_warps": 4},
        )


def soft_ops_variants():
    """The passes of code_entropy and soft_quantize at IBQ's shape (D streamed: every D > 64 compiles the
    same), LFQ's (D = 18) and every width of a single D tile (16 to 64), fp32 as tf32, bf16 and exact
    fp32."""
    module = importlib.import_module("fastvq.ops.triton._softmax_passes")
    grad_module = importlib.import_module("fastvq.ops.triton._softmax_grad")
    shapes = [(1024, 262144, 256), (2048, 131072, 16), (8192, 262144, 18), (4096, 16384, 64)]
    dtypes = [(torch.float32, "tf32"), (torch.bfloat16, "bf16"), (torch.float32, "ieee")]
    floats = dict(inv_temperature="fp32", clamp_min="fp32", log_clamp_min="fp32")
    for (n, k, d), (dtype, precision) in itertools.product(shapes, dtypes):
        t = TORCH_TO_TRITON[dtype]
        metric = {"tf32": "dot", "bf16": "l2", "ieee": "cosine"}[precision]
        grad_precision = "ieee" if precision == "ieee" else "tf32"
        for soft in (False, True):
            config = module._stats_config(n, k, d, 1, precision, CONFIG_DEVICE, soft)
            options = {"num_warps": config.pop("num_warps"), "num_stages": config.pop("num_stages")}
            config.pop("splits"), config.pop("codes_per_split")
            constexprs = dict(
                METRIC=metric,
                ENTROPY=not soft,
                SOFT=soft,
                GRAD_PRECISION=grad_precision,
                **dot_options(precision),
                **config,
            )
            pointers = dict(
                x_ptr=t,
                code_ptr=t,
                bias_ptr="fp32",
                max_ptr="fp32",
                sum_ptr="fp32",
                aux_ptr="fp32",
                arg_ptr="i64",
                value_ptr="fp32",
            )
            yield (
                f"softmax stats soft={soft} {n}x{k}x{d} {t} {precision} {metric}",
                module._softmax_stats_kernel,
                pointers,
                dict(N="i32", K="i32", D="i32", codes_per_split="i32", d_chunks="i32", **floats),
                constexprs,
                options,
            )
        config = module.pass_config(search_config(n, k, d, 1, precision, CONFIG_DEVICE, logits=True), d, precision)
        options = {"num_warps": config.pop("num_warps"), "num_stages": config.pop("num_stages")}
        config.pop("splits"), config.pop("codes_per_split")
        for clamped in (False, True):
            pointers = dict(x_ptr=t, code_ptr=t, bias_ptr="fp32", norm_ptr="fp32", value_ptr="fp32", out_ptr="fp32")
            yield (
                f"softmax token sums clamped={clamped} {n}x{k}x{d} {t} {precision}",
                module._token_sums_kernel,
                pointers,
                dict(N="i32", K="i32", D="i32", codes_per_split="i32", **floats),
                dict(METRIC=metric, CLAMPED=clamped, **dot_options(precision), **config),
                options,
            )
        config = module.pass_config(grad_config(k, n, d, 1, CONFIG_DEVICE, True), d, precision)
        options = {"num_warps": config.pop("num_warps"), "num_stages": config.pop("num_stages")}
        config.pop("splits"), config.pop("per_split"), config.pop("BLOCK_DO")
        pointers = dict(x_ptr=t, code_ptr=t, bias_ptr="fp32", norm_ptr="fp32", keep_ptr="fp32", out_ptr="fp32")
        yield (
            f"softmax code sums {n}x{k}x{d} {t} {precision}",
            module._code_sums_kernel,
            pointers,
            dict(N="i32", K="i32", D="i32", per_split="i32", **floats),
            dict(METRIC=metric, **dot_options(precision), **config),
            options,
        )
        for code_side, entropy_terms in itertools.product((False, True), (True, False)):
            config = grad_module.grad_pass_config(n, k, d, 1, precision, CONFIG_DEVICE, code_side, not entropy_terms)
            options = {"num_warps": config.pop("num_warps"), "num_stages": config.pop("num_stages")}
            config.pop("splits"), config.pop("per_split")
            constexprs = dict(
                CODE_SIDE=code_side,
                METRIC=metric,
                LOG_TERM=entropy_terms,
                MEAN_TERM=entropy_terms,
                G_TERM=not entropy_terms,
                SOFT_VALUES=code_side and not entropy_terms,
                GRAD_PRECISION=grad_precision,
                **dot_options(precision),
                **config,
            )
            pointers = dict(
                x_ptr=t,
                code_ptr=t,
                bias_ptr="fp32",
                norm_ptr="fp32",
                coef_ptr="fp32",
                value_ptr="fp32",
                g_ptr="fp32",
                out_ptr="fp32",
            )
            op = "code_entropy" if entropy_terms else "soft_quantize"
            yield (
                f"softmax grad {op} code_side={code_side} {n}x{k}x{d} {t} {precision} {metric}",
                grad_module._softmax_grad_kernel,
                pointers,
                dict(N="i32", K="i32", D="i32", per_split="i32", **floats),
                constexprs,
                options,
            )


VARIANTS = [search_variants, code_cross_entropy_variants, code_stats_variants, soft_ops_variants]


def register_usage(ptx: str, capability: int) -> tuple[int, int]:
    """(registers per thread, spill bytes stored + loaded) that ptxas reports for a kernel's PTX,
    from the ptxas this triton itself uses for `capability`."""
    arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    ptxas = get_ptxas(capability).path
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        report = subprocess.run(
            [ptxas, f"-arch={arch}", "-v", str(path), "-o", str(path.with_suffix(".o"))],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    ((_, registers, spills),) = usage(report)
    return registers, spills


def main(capabilities=(90, 80), only=None):
    count, spilling = 0, []
    for make in VARIANTS if only is None else [only]:
        for name, kernel, pointers, ints, constexprs, options in make():
            sig = _signature(kernel.arg_names, pointers, ints, constexprs)
            for capability in capabilities:
                source = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
                compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
                registers, spills = register_usage(compiled.asm["ptx"], capability)
                warps = options.get("num_warps", 4)
                print(
                    f"sm_{capability} {name} warps={warps}: {compiled.metadata.shared} B shared, "
                    f"{registers} registers, {spills} B spilled",
                    flush=True,
                )
                count += 1
                if spills and capability in SPILL_FREE:
                    spilling.append(f"sm_{capability} {name}")
    print(f"compiled {count} variants")
    if spilling:
        print(f"{len(spilling)} variants spill registers:\n  " + "\n  ".join(spilling))
        sys.exit(1)


if __name__ == "__main__":
    main(*([tuple(int(c) for c in sys.argv[1:])] if len(sys.argv) > 1 else []))
