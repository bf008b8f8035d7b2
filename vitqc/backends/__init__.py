"""Backends lower a materialized quantized model (an artifact, or what ``vitqc.compile`` returns) to code that
runs its integers.

* :mod:`vitqc.backends.packing`: dense bit packing (2..8-bit fields, ternary at 2 bits or 5 trits a byte).
* :mod:`vitqc.backends.packed`: integer kernels over packed weights (``torch._int_mm`` int8 GEMM, zero points
  folded, static or per-token activation scales), saved as a ``torch.export`` program (no pickle).
  ``lower_packed(artifact_or_graph)`` -> ``PackedProgram``; ``save_packed`` / ``load_packed``.
* :mod:`vitqc.backends.executorch`: PT2E + XNNPACK ``.pte`` on vitqc's weight codes and activation grids
  (:mod:`vitqc.backends.xnnpack_act`: how each grid reaches XNNPACK's int8 linears;
  :mod:`vitqc.backends.xnnpack_rewrite`: graph rewrites that keep the model inside XNNPACK's delegates).
  ``lower_executorch(..., exact=False)`` -> ``PteResult``; ``save_pte`` / ``load_pte`` / ``run_pte``.

Both start from the quantized ``torch.export`` program (the artifact's ``quantized.pt2``, or an export of the
graph) and find each layer by its stored tensors and module path. The command line is ``vitqc export``.
Modules are imported on use (ExecuTorch is heavy).
"""
