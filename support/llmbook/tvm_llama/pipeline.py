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
    """LLVM for this CPU. Fast-math reassociation lets LLVM vectorise the sums of a
    matmul."""
    spec = {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}
    if threads:
        spec["num-cores"] = threads
    if fast_math:
        spec |= {"fast-math-reassoc": True, "fast-math-contract": True}
    return tvm.target.Target(spec)


def cuda_target() -> tvm.target.Target:
    """The first CUDA GPU, with its compute capability and limits read from the device.
    """
    return tvm.target.Target.from_device(tvm.cuda(0))


class ParallelCPU(dlight.ScheduleRule):
    """A small CPU schedule: inline elementwise producers, then run the spatial (output)
    loops of every block across threads; reductions stay innermost, where LLVM
    vectorises them. Decode's dot products are split into vector-wide partial sums;
    products over many tokens (prefill, a batch) loop over weight rows outside and
    tokens inside."""

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        # not a plain loop nest (e.g. already hand-scheduled): leave it
        if blocks is None:
            return None
        for block in try_inline(sch, blocks):
            kinds, loops = block.dom_kind(), sch.get_loops(block.block_rv)
            if "O" in kinds or "S" not in kinds or len(loops) != len(kinds):
                continue
            spatial = [loop for loop, k in zip(loops, kinds) if k == "S"]
            reduction = [loop for loop, k in zip(loops, kinds) if k == "R"]
            sizes = [sch.get(loop).extent for loop in spatial]
            fixed = [isinstance(n, tirx.IntImm) for n in sizes]
            # weight rows: outputs of a fixed number > 1; tokens: a
            # symbolic number (prompt, batch)
            rows = [i for i, n in enumerate(sizes) if fixed[i] and n.value > 1]
            tokens = [i for i in range(len(sizes)) if not fixed[i]]
            if reduction and rows and tokens:
                # prefill's and a batch's matrix products: weight rows
                # outside, tokens inside, so each weight row is
                # fetched from memory once and reused for every token
                k = sch.get(reduction[0]).extent
                if (
                    len(reduction) == 1
                    and isinstance(k, tirx.IntImm)
                    and k.value % 16 == 0
                ):
                    register_tile(sch, block.block_rv)
                else:
                    rest = [i for i in range(len(sizes)) if i not in rows + tokens]
                    sch.reorder(*[spatial[i] for i in rows + tokens + rest], *reduction)
                    sch.parallel(sch.fuse(*[spatial[i] for i in rows]))
                    sch.decompose_reduction(block.block_rv, reduction[0])
                continue
            sch.reorder(*spatial, *reduction)
            fused = sch.fuse(*spatial)
            if reduction and len(reduction) == 1 and all(fixed):
                # decode (static shapes): each output's dot product as
                # 16 partial sums side by side (rfactor), so a row is
                # read with full-width vector loads and fused
                # multiply-adds; a second, small loop adds the 16
                # partial sums up
                ko, ki = sch.split(reduction[0], [None, 16])
                # partial sums in the last, contiguous axis
                partial = sch.rfactor(ki, -1)
                outputs, steps, lanes = sch.get_loops(partial)
                sch.parallel(outputs)
                sch.vectorize(lanes)
                sch.decompose_reduction(partial, steps)
                sch.parallel(sch.get_loops(block.block_rv)[0])
            elif reduction:  # norms and softmax: rows in parallel
                sch.parallel(fused)
                # zero each output before its reduction loop, not
                # behind an `if k == 0` inside it
                sch.decompose_reduction(block.block_rv, reduction[0])
            else:  # elementwise: threads outside, SIMD inside
                outer, inner = sch.split(fused, [None, 16])
                sch.parallel(outer)
                sch.vectorize(inner)
        return sch


def register_tile(
    sch: s_tir.Schedule, block, rows: int = 2, tokens: int = 4, lanes: int = 16
):
    """A matrix product over a symbolic number of tokens, as a register tile: for `rows`
    weight rows and `tokens` tokens at a time, the dot products run as `lanes`-wide
    partial sums kept in vector registers; each weight vector loaded serves `tokens`
    tokens, each token vector `rows` rows. The token count is padded up to a multiple of
    `tokens` (`pad_einsum`), so no bounds test sits inside the tile."""
    iters = sch.get(block).iter_vars
    symbolic = [not isinstance(iv.dom.extent, tirx.IntImm) for iv in iters]
    sch.pad_einsum(block, [tokens if s else 1 for s in symbolic])
    # the padded copy of the input: small, one thread
    for pad in sch.get_producers(block):
        *_, inner = sch.split(sch.fuse(*sch.get_loops(pad)), [None, lanes])
        sch.vectorize(inner)
    unpad = sch.get_consumers(block)  # copies the valid rows of the padded output back
    loops = sch.get_loops(block)  # one per block iterator, in order
    spatial = [iv.iter_type == tirx.IterVar.DataPar for iv in iters]
    row = sch.fuse(
        *[lp for lp, sp, sy in zip(loops, spatial, symbolic) if sp and not sy]
    )
    token = sch.fuse(*[lp for lp, sp, sy in zip(loops, spatial, symbolic) if sp and sy])
    (k,) = [lp for lp, sp in zip(loops, spatial) if not sp]
    sch.reorder(row, token, k)
    r_o, r_i = sch.split(
        row, [None, rows if sch.get(row).extent.value % rows == 0 else 1]
    )
    t_o, t_i = sch.split(token, [None, tokens])
    k_o, k_i = sch.split(k, [None, lanes])
    sch.reorder(r_o, t_o, k_o, r_i, t_i, k_i)
    partial = sch.rfactor(k_i, -1)  # the tile's partial sums, [tokens, rows, lanes]
    sch.set_scope(partial, 0, "local")  # in registers once the tile loops are unrolled
    r_o, t_o, k_o, r_i, t_i, k_i = sch.get_loops(partial)
    sch.reverse_compute_at(block, t_o)  # add up the lanes right after each tile
    for copy in unpad:
        sch.reverse_compute_at(copy, t_o)
    sch.set_scope(block, 0, "local")  # the padded output, one tile at a time
    sch.parallel(r_o)
    sch.unroll(r_i)
    sch.unroll(t_i)
    sch.vectorize(k_i)
    sch.decompose_reduction(partial, k_o)


@tvm.transform.module_pass(opt_level=0, name="MarkNoAlias")
def mark_noalias(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Declare the buffer arguments of every kernel distinct (`tirx.noalias`). The
    kernels made from Relax operators have it; the paged cache's own kernels do not, and
    in one LLVM module with them the matrix products compiled to about half their vector
    code (section 2)."""
    for gv, func in list(mod.functions.items()):
        if isinstance(func, tirx.PrimFunc) and "tirx.noalias" not in (func.attrs or {}):
            mod[gv] = func.with_attr("tirx.noalias", True)
    return mod


def passes(target: tvm.target.Target, schedule: bool = True) -> tvm.transform.Pass:
    """The tutorial's LLM pipeline for `target`. CUDA: dlight GPU rules
    (RewriteCUDAGraph captures nothing unless the build sets
    `relax.backend.use_cuda_graph`, which this one does not). CPU: our ParallelCPU rule
    (schedule=False leaves the naive loops) and no CUDA graphs."""
    on_gpu = target.kind.name == "cuda"
    if on_gpu:
        rules = [
            dlight.gpu.Matmul(),
            dlight.gpu.GEMV(),
            dlight.gpu.Reduction(),
            dlight.gpu.GeneralReduction(),
            dlight.gpu.Fallback(),
        ]
    else:
        rules = [ParallelCPU()] if schedule else []
    return tvm.transform.Sequential(
        [
            # 1. graph level: x @ W.T as one op, operators to TIR,
            # neighbours fused into one kernel
            relax.transform.FuseTransposeMatmul(),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination(),
            # 2. loop level: how each kernel maps onto the hardware
            *([dlight.ApplyDefaultSchedule(*rules)] if rules else []),
            mark_noalias,
            # 3. lowering to the virtual machine: memory planned once,
            # freed early, shapes at run time
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
        ]
    )


PIPELINE = "llmbook"
# TVM refuses to register a name twice; running this cell again (or importing the
# package's copy after it) replaces the earlier definition instead
relax.pipeline.PIPELINE_MAP.pop(PIPELINE, None)


@relax.register_pipeline(PIPELINE)
def llmbook_pipeline(schedule: bool = True) -> tvm.transform.Pass:
    """The pipeline under a name, as TVM registers its own ("zero", "default"):
    `relax.get_pipeline("llmbook")` makes it, `tvm.compile(..., relax_pipeline=
    "llmbook")` runs it. The passes depend on the target, which tvm.compile makes the
    current one before it runs the pipeline."""

    @tvm.transform.module_pass(opt_level=0, name="LLMBookPipeline")
    def run(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return passes(tvm.target.Target.current(allow_none=False), schedule)(mod)

    return run


def compile_model(model, target: tvm.target.Target, schedule: bool = True):
    """Trace `model` (a LlamaForCausalLM made for `target`) and compile it with the
    registered pipeline: (executable, parameter names in the order the functions take
    them)."""
    mod, named = model.export_tvm(spec=model.spec())
    pipeline = relax.get_pipeline(PIPELINE, schedule=schedule)
    executable = tvm.compile(mod, target, relax_pipeline=pipeline)
    return executable, [name for name, _ in named]
