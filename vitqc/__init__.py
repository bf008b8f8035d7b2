"""vitqc: post-training quantization of Vision Transformers as a compiler over torch.fx graphs.

    import vitqc
    result = vitqc.compile("timm:deit_tiny_patch16_224", "joint-w4a4", calib="images:calib/")   # CompileResult
    result.save("deit.vitqc"); result.quantized(images); result.measurement
    art = vitqc.load("deit.vitqc"); logits = art.quantized(images)      # artifact, no model class needed
    vitqc.evaluate("deit.vitqc", "val/")                                # top-1, agreement, per-layer SQNR
    vitqc.export("deit.vitqc", "executorch")                            # a backend (vitqc.backends.BACKENDS)
    vitqc.report("deit.vitqc", "deit.report")                           # HTML page with plots
    vitqc.generate("timm:deit_tiny_patch16_224", "inversion", "calib/", per_class=10)   # data-free images

Write a pass: subclass ``vitqc.VitqcPass``, decorate with ``@vitqc.register_pass`` (see README); calibration
sources and backends register the same way (``vitqc.register_source``, ``vitqc.register_backend``) or through
entry points (:mod:`vitqc.registry`).
"""
from vitqc.artifact import Artifact, load_artifact as load
from vitqc.backends import export, register_backend
from vitqc.calib.spec import Calibration, generate, register_source
from vitqc.compiler import CompileResult, compile, run_pipeline
from vitqc.errors import VitqcError
from vitqc.evaluate import evaluate
from vitqc.layers import Layer, LayerTable
from vitqc.passes.base import (CompileContext, NoOptions, PassResult, VitqcPass, graph_property, register_pass,
                               registered_passes)
from vitqc.pipeline import Pipeline, PassStep, builtin_pipelines, load_pipeline
from vitqc.report import write_report as report

__version__ = "0.1.0"
__all__ = ["compile", "run_pipeline", "CompileResult", "load", "Artifact", "evaluate", "export", "report",
           "generate", "Calibration", "Layer", "LayerTable", "VitqcError", "VitqcPass", "PassResult",
           "CompileContext", "NoOptions", "register_pass", "register_source", "register_backend",
           "registered_passes", "graph_property", "Pipeline", "PassStep", "builtin_pipelines", "load_pipeline"]
