"""One loader for every way a user can name a model.

=================================  =============================================================================
``timm:NAME``                      ``timm.create_model(NAME, pretrained=..., **model_kwargs)``
``FILE.pt`` / ``FILE.pth``         a whole pickled ``nn.Module`` (``torch.save(model)``); unpickling runs code, so
                                   it is done only for a file the user names (``weights_only=False``)
``FILE.pt2``                       a ``torch.export`` program: ``torch.export.load(FILE).module()``
``FILE.py:factory``                imports FILE by path and calls ``factory(**model_kwargs)``
``hf:DIR_OR_ID``                   a transformers image classifier or backbone: ``from_pretrained`` of a
                                   ``save_pretrained`` directory (offline) or a hub id; model kwargs go to
                                   ``from_pretrained`` (``{"attn_implementation": "eager"}``; ``"output"`` picks
                                   ``logits`` / ``pooler_output`` / ``last_hidden_state``); preprocessing from its
                                   ``preprocessor_config.json`` (:mod:`vitqc.hf`)
=================================  =============================================================================

``checkpoint`` (any form): a ``.safetensors`` file or a ``torch.save``'d state dict (read with
``weights_only=True``; ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and a DDP ``module.`` prefix are
accepted), loaded strictly. Every problem is a one-line :class:`~vitqc.errors.VitqcError`.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib.util
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitqc.errors import VitqcError

__all__ = ["LoadedModel", "load_model", "load_model_and_preprocess", "example_input", "load_state_dict_file", "sha256_file"]


@dataclass
class LoadedModel:
    module: nn.Module
    source: dict[str, Any] = field(default_factory=dict)  # JSON-able: where the model came from
    # timm.data.resolve_data_config for timm models, the image processor's config for hf: models, else None
    data_config: dict[str, Any] | None = None

    @property
    def preprocess(self):
        """How image files become this model's inputs (a :class:`vitqc.data.Preprocess`), or None when the model
        does not say (then the user gives --img-size / --mean / --std)."""
        from vitqc.data import Preprocess

        return None if self.data_config is None else Preprocess.from_timm(self.data_config)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _existing_file(path: str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise VitqcError(f"{what} {path} does not exist; check the path (or use timm:NAME, file.py:factory, demo)")
    if not p.is_file():
        raise VitqcError(f"{what} {path} is not a file")
    return p


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


# ---------------------------------------------------------------------------------------------- state dicts
def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = "an nn.Module" if isinstance(obj, nn.Module) else f"a {type(obj).__name__}"
        raise VitqcError(f"checkpoint {path} holds {kind}, not a state dict of tensors")
    keys = list(obj)
    if all(k.startswith("module.") for k in keys):  # saved from DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file or a torch state dict file (``weights_only=True``)."""
    p = _existing_file(str(path), "checkpoint")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except Exception as e:
            raise VitqcError(f"could not read checkpoint {p} as safetensors ({_first_line(e)})") from None
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise VitqcError(f"checkpoint {p} holds more than tensors (a pickled object, maybe a whole model); "
                             f"give it as the model (vitqc ... {p}) instead of --checkpoint") from None
        raise VitqcError(f"could not read checkpoint {p}: not a torch.save file ({_first_line(e)})") from None
    except Exception as e:
        raise VitqcError(f"could not read checkpoint {p}: not a torch.save or safetensors file "
                         f"({_first_line(e)})") from None
    return _unwrap_state_dict(obj, p)


def _keys_summary(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > n else shown


def _load_checkpoint(module: nn.Module, path: str, spec: str) -> dict[str, Any]:
    state = load_state_dict_file(path)
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # size mismatches raise even with strict=False
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        detail = "; ".join(lines[:2]) + (f" (+{len(lines) - 2} more)" if len(lines) > 2 else "")
        raise VitqcError(f"checkpoint {path} does not fit {spec}: {detail or _first_line(e)}") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_keys_summary(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_keys_summary(unexpected)}")
        raise VitqcError(f"checkpoint {path} does not fit {spec}: {'; '.join(parts)}")
    return {"path": str(Path(path).resolve()), "sha256": sha256_file(path)}


# --------------------------------------------------------------------------------------------------- forms
def _is_network_error(e: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        mod = type(cur).__module__ or ""
        name = type(cur).__name__
        if isinstance(cur, (ConnectionError, TimeoutError)) or mod.split(".")[0] in (
                "huggingface_hub", "httpx", "httpcore", "requests", "urllib3", "socket"):
            return True
        if isinstance(cur, OSError) and any(w in str(cur).lower() for w in (
                "connect", "offline", "network", "resolve", "hugging", "internet", "download")):
            return True
        if "Offline" in name or "Connect" in name:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _timm_model(name: str, kwargs: dict[str, Any], pretrained: bool) -> nn.Module:
    import timm

    if not name:
        raise VitqcError("empty timm model name: write timm:NAME (timm.list_models() lists them)")
    hub = name.startswith(("hf-hub:", "hf_hub:", "local-dir:"))
    if not hub and not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise VitqcError(f"unknown timm model {name!r} (timm.list_models('*pattern*') lists them){hint}")
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except VitqcError:
        raise
    except TypeError as e:
        raise VitqcError(f"timm:{name} does not accept these model kwargs {sorted(kwargs)}: {_first_line(e)}") from None
    except Exception as e:
        if pretrained and _is_network_error(e):
            raise VitqcError(f"could not download pretrained weights for timm:{name} (offline?); pass "
                             f"--checkpoint FILE with the weights instead") from None
        raise VitqcError(f"could not create timm:{name}: {_first_line(e)}") from None


def _pickled_module(path: Path) -> nn.Module:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError, ImportError) as e:
        raise VitqcError(f"could not unpickle the model in {path}: {_first_line(e)} (the class it was saved "
                         f"from must be importable; or give FILE.py:factory and --checkpoint)") from None
    except Exception as e:
        raise VitqcError(f"could not read {path}: not a torch.save file ({_first_line(e)})") from None
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict) and (obj and all(isinstance(v, torch.Tensor) for v in obj.values())
                                  or any(k in obj for k in ("state_dict", "model", "model_state_dict"))):
        raise VitqcError(f"{path} holds a state dict, not a module: use timm:NAME --checkpoint {path} "
                         f"(or FILE.py:factory --checkpoint {path})")
    raise VitqcError(f"{path} holds a {type(obj).__name__}, not an nn.Module")


def _exported_module(path: Path) -> nn.Module:
    if not zipfile.is_zipfile(path):
        raise VitqcError(f"could not read {path}: not a torch.export program (torch.export.save writes a zip)")
    try:
        return torch.export.load(str(path)).module()
    except Exception as e:
        raise VitqcError(f"could not load the torch.export program {path}: {_first_line(e)}") from None


def _factory_module(path: Path, factory: str, kwargs: dict[str, Any]) -> nn.Module:
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", path.stem)
    mod_name = f"vitqc_user_model_{stem}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, str(path))
    if spec is None or spec.loader is None:
        raise VitqcError(f"cannot import {path} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(mod_name, None)
        raise VitqcError(f"importing {path} failed: {_first_line(e)}") from None
    fn = getattr(module, factory, None)
    if fn is None:
        defined = sorted(k for k, v in vars(module).items()
                         if callable(v) and not k.startswith("_") and getattr(v, "__module__", None) == mod_name)
        hint = f" (it defines: {', '.join(defined)})" if defined else ""
        raise VitqcError(f"{path} has no {factory!r}{hint}")
    if not callable(fn):
        raise VitqcError(f"{path}:{factory} is a {type(fn).__name__}, not a callable returning an nn.Module")
    try:
        out = fn(**kwargs)
    except Exception as e:
        raise VitqcError(f"{path}:{factory}(**{kwargs!r}) failed: {_first_line(e)}") from None
    if not isinstance(out, nn.Module):
        raise VitqcError(f"{path}:{factory}() returned a {type(out).__name__}, not an nn.Module")
    return out


_FACTORY_SPEC = re.compile(r"^(?P<file>.+\.py):(?P<fn>[A-Za-z_]\w*)$")


def _data_config(module: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    if getattr(module, "pretrained_cfg", None) is None and getattr(module, "default_cfg", None) is None:
        return None
    import timm.data

    try:
        cfg = dict(timm.data.resolve_data_config({}, model=module))
    except Exception:  # pragma: no cover - a module with an odd cfg
        return None
    # timm keeps the pretrained cfg's input size when img_size/in_chans are overridden: use the model's own
    size = kwargs.get("img_size")
    if size is None:
        pe_size = getattr(getattr(module, "patch_embed", None), "img_size", None)
        size = pe_size if isinstance(pe_size, (int, tuple, list)) else None
    chans = kwargs.get("in_chans", cfg.get("input_size", (3,))[0])
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        cfg["input_size"] = (int(chans), int(h), int(w))
    elif "in_chans" in kwargs and "input_size" in cfg:
        cfg["input_size"] = (int(chans), *cfg["input_size"][1:])
    return cfg


def load_model(spec: str, model_kwargs: dict[str, Any] | None = None, checkpoint: str | None = None,
               pretrained: bool = False) -> LoadedModel:
    """Load a model given as ``timm:NAME``, ``hf:DIR_OR_ID``, ``FILE.pt``/``.pth``, ``FILE.pt2`` or ``FILE.py:factory``
    (eval mode)."""
    kwargs = dict(model_kwargs or {})
    source: dict[str, Any] = {"spec": spec}
    hf_data_config = None
    if spec.startswith("timm:"):
        name = spec[len("timm:"):]
        module = _timm_model(name, kwargs, pretrained)
        source.update(form="timm", name=name, pretrained=pretrained)
    elif spec.startswith("hf:"):
        from vitqc.hf import load_hf

        module, hf_source, hf_data_config = load_hf(spec[len("hf:"):], kwargs)
        source.update(hf_source)
    elif (m := _FACTORY_SPEC.match(spec)) is not None:
        path = _existing_file(m["file"], "model file")
        module = _factory_module(path, m["fn"], kwargs)
        source.update(form="factory", path=str(path.resolve()), factory=m["fn"], sha256=sha256_file(path))
    elif spec.endswith(".pt2"):
        path = _existing_file(spec, "model file")
        module = _exported_module(path)
        source.update(form="export", path=str(path.resolve()), sha256=sha256_file(path))
    elif spec.endswith((".pt", ".pth", ".bin", ".ckpt")):
        path = _existing_file(spec, "model file")
        module = _pickled_module(path)
        source.update(form="pickle", path=str(path.resolve()), sha256=sha256_file(path))
    elif spec.endswith(".safetensors"):
        raise VitqcError(f"{spec} holds only weights: give the architecture and the weights as "
                         f"timm:NAME --checkpoint {spec}")
    else:
        hint = ""
        try:
            import timm

            if timm.is_model(spec):
                hint = f"; did you mean timm:{spec}?"
        except Exception:  # pragma: no cover
            pass
        raise VitqcError(f"cannot tell what model {spec!r} is: use timm:NAME, hf:DIR_OR_ID, FILE.pt, FILE.pt2 or "
                         f"FILE.py:factory{hint}")
    if kwargs and source["form"] in ("pickle", "export"):
        raise VitqcError(f"model kwargs {sorted(kwargs)} only apply to timm:NAME and FILE.py:factory models")
    source["kwargs"] = _jsonable(kwargs)
    if checkpoint is not None:
        source["checkpoint"] = _load_checkpoint(module, checkpoint, spec)
    try:
        module.eval()
    except NotImplementedError:  # torch.export'ed modules refuse .eval(); they were exported in eval mode
        pass
    data_config = hf_data_config if source["form"] == "hf" else _data_config(module, kwargs)
    return LoadedModel(module=module, source=source, data_config=data_config)


def example_input(loaded: LoadedModel, batch_size: int = 1, seed: int = 0) -> torch.Tensor:
    """A random (seeded) input batch of the model's input size (from its timm data config)."""
    cfg = loaded.data_config or {}
    size = cfg.get("input_size")
    if not size:
        raise VitqcError("the model does not say its input size: pass --img-size N (and --in-chans C)")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, *[int(s) for s in size], generator=gen)


def load_model_and_preprocess(spec: str, model_kwargs: dict[str, Any] | None = None, checkpoint: str | None = None,
                              pretrained: bool = False):
    """(LoadedModel, Preprocess or None): :func:`load_model`, plus the embedded ``demo`` model."""
    if spec == "demo":
        from vitqc import demo

        if model_kwargs or checkpoint or pretrained:
            raise VitqcError("the demo model takes no model kwargs, checkpoint or pretrained weights")
        loaded = LoadedModel(demo.load_demo_model(), {"form": "demo", "card": demo.demo_card()["name"]})
        return loaded, demo.demo_preprocess()
    loaded = load_model(spec, model_kwargs=model_kwargs, checkpoint=None if checkpoint is None else str(checkpoint),
                        pretrained=pretrained)
    return loaded, loaded.preprocess
