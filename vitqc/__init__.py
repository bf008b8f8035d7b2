"""vitqc: post-training quantization of Vision Transformers as a compiler over torch.fx graphs.

    import vitqc
    q = vitqc.compile(model, "minmax-w8a8", calib_images)          # quantized torch.fx GraphModule
    art = vitqc.load("model.vitqc"); logits = art.quantized(images)  # artifact, no model class needed

Write a pass: subclass ``vitqc.VitqcPass``, decorate with ``@vitqc.register_pass`` (see README).
"""
from vitqc.artifact import Artifact, load_artifact as load
from vitqc.compiler import compile
from vitqc.errors import VitqcError
from vitqc.passes.base import (CompileContext, NoOptions, PassResult, VitqcPass, graph_property, register_pass,
                               registered_passes)
from vitqc.pipeline import Pipeline, PassStep, builtin_pipelines, load_pipeline

__version__ = "0.1.0"
__all__ = ["compile", "load", "Artifact", "VitqcError", "VitqcPass", "PassResult", "CompileContext", "NoOptions",
           "register_pass", "registered_passes", "graph_property", "Pipeline", "PassStep", "builtin_pipelines",
           "load_pipeline"]
