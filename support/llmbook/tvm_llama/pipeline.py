# Generated from notebooks/06_tvm.ipynb by `python -m llmbook.export`.
# Edit the notebook, then re-export; tests/test_export.py checks that the two agree.

"""Targets, the CPU schedule rule and the Relax pipeline (CPU and CUDA). Written in
notebooks/06_tvm.ipynb."""
import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline


def cpu_target(fast_math: bool = True, threads: int | None = None) -> tvm.target.Target:
    """LLVM for this CPU. Fast-math reassociation lets LLVM vectorise the sums of a matmul."""
    spec = {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}
    if threads:
        spec["num-cores"] = threads
    if fast_math:
        spec |= {"fast-math-reassoc": True, "fast-math-contract": True}
    return tvm.target.Target(spec)


def cuda_target() -> tvm.target.Target:
    """The first CUDA GPU, with its compute capability and limits read from the device."""
    return tvm.target.Target.from_device(tvm.cuda(0))


class ParallelCPU(dlight.ScheduleRule):
    """A small CPU schedule: inline elementwise producers, then run the spatial (output) loops of
    every block across threads; reductions stay innermost, where LLVM vectorises them, and decode's
    dot products are split into vector-wide partial sums."""

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if blocks is None:  # not a plain loop nest (e.g. already hand-scheduled): leave it
            return None
        for block in try_inline(sch, blocks):
            kinds, loops = block.dom_kind(), sch.get_loops(block.block_rv)
            if "O" in kinds or "S" not in kinds or len(loops) != len(kinds):
                continue
            spatial = [loop for loop, k in zip(loops, kinds) if k == "S"]
            reduction = [loop for loop, k in zip(loops, kinds) if k == "R"]
            sch.reorder(*spatial, *reduction)
            fused = sch.fuse(*spatial)
            if reduction and len(reduction) == 1 and isinstance(sch.get(fused).extent, tirx.IntImm):
                # decode (static shapes): each output's dot product as 16 partial sums side by side
                # (rfactor), so a row is read with full-width vector loads and fused multiply-adds;
                # a second, small loop adds the 16 partial sums up
                ko, ki = sch.split(reduction[0], [None, 16])
                partial = sch.rfactor(ki, -1)  # partial sums in the last, contiguous axis
                rows, steps, lanes = sch.get_loops(partial)
                sch.parallel(rows)
                sch.vectorize(lanes)
                sch.decompose_reduction(partial, steps)
                sch.parallel(sch.get_loops(block.block_rv)[0])
            elif reduction:  # prefill's matrix products (symbolic length), norms
                sch.parallel(fused)
                # zero each output before its reduction loop, not behind an `if k == 0` inside it
                sch.decompose_reduction(block.block_rv, reduction[0])
            else:  # elementwise: threads outside, SIMD inside
                outer, inner = sch.split(fused, [None, 16])
                sch.parallel(outer)
                sch.vectorize(inner)
        return sch


def pipeline(target: tvm.target.Target, schedule: bool = True) -> tvm.transform.Pass:
    """The tutorial's LLM pipeline. CUDA: dlight GPU rules and CUDA graphs. CPU: our ParallelCPU
    rule (schedule=False leaves the naive loops) and no CUDA graphs."""
    on_gpu = target.kind.name == "cuda"
    if on_gpu:
        rules = [dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(),
                 dlight.gpu.GeneralReduction(), dlight.gpu.Fallback()]
    else:
        rules = [ParallelCPU()] if schedule else []
    return tvm.transform.Sequential([
        # 1. graph level: x @ W.T as one op, operators to TIR, neighbours fused into one kernel
        relax.transform.FuseTransposeMatmul(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
        # 2. loop level: how each kernel maps onto the hardware
        *([dlight.ApplyDefaultSchedule(*rules)] if rules else []),
        # 3. lowering to the virtual machine: memory planned once, freed early, shapes at run time
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
        *([relax.transform.RewriteCUDAGraph()] if on_gpu else []),
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ])


def compile_model(model, target: tvm.target.Target, schedule: bool = True):
    """Trace `model` (a LlamaForCausalLM made for `target`) and compile it:
    (executable, parameter names in the order the functions take them)."""
    mod, named = model.export_tvm(spec=model.spec())
    with target:
        executable = tvm.compile(mod, target, relax_pipeline=pipeline(target, schedule))
    return executable, [name for name, _ in named]
