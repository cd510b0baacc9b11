"""Loading the user's model from what the user has: every model format hwrel reads, in one place.

:func:`load_model` takes a built-in model name (:mod:`hwrel.models`) or a path:

- ``.pt2``: a ``torch.export`` program (safe: no code runs), rebuilt as ``nn`` modules
  (:func:`modules_from_export`) so that quantization and injection work on it as on any module;
- ``.safetensors``, or a state dict saved with ``torch.save`` (read with ``weights_only=True``),
  together with an architecture: a built-in one (``digits-mlp``, ...) or the user's own
  ``nn.Module`` class as ``package.module:ClassName`` (or ``path/to/file.py:ClassName``),
  constructed with ``architecture_args`` (a JSON object of keyword arguments or a list of
  positional ones);
- a Hugging Face ``transformers`` model folder (``config.json`` + ``model.safetensors``), read with
  ``from_pretrained`` from the local folder only (no network; needs ``pip install 'hwrel[hf]'``);
- a fully pickled ``nn.Module`` only with ``trust_pickle=True`` (unpickling runs code from the file).

Every problem is a one-line :class:`HwrelError` naming the file (or the architecture) and what is
wrong with it. The returned module is in eval mode; the user's objects are never modified.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hwrel import models
from hwrel.errors import HwrelError

KINDS = ("built-in", "torch.export", "safetensors", "state dict", "Hugging Face", "pickle")


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model ready for analysis.

    ``name``: a short name for output and default file names (the built-in name or the file's
    stem). ``kind``: one of :data:`KINDS`. ``path``: the file or folder read (None for a built-in).
    ``reference``: the built-in model with its data split, else None. ``input_shape``: the
    per-sample input shape where the model itself records it (built-in models, ``.pt2`` programs),
    else None (then the data's shape, or ``input_shape=``, decides).
    """

    module: nn.Module
    name: str
    kind: str
    path: Path | None = None
    reference: models.ReferenceModel | None = None
    input_shape: tuple[int, ...] | None = None
    _exported: dict = field(default_factory=dict, repr=False)

    def module_for(self, input_shape: tuple[int, ...], dtype: torch.dtype | None = None) -> nn.Module:
        """The module to analyse for inputs of ``input_shape`` and ``dtype`` (``torch.long`` for a
        language model's token ids; None: the model's own, token ids where its main input is
        ``input_ids``, else float32). A Hugging Face model's forward checks shapes in Python, which
        torch.fx cannot trace: it is exported once per shape and dtype with ``torch.export`` (a
        dynamic batch) and rebuilt from ``nn`` modules (:func:`modules_from_export`), which compute
        the same outputs; where no module rule covers an operation (``aten.embedding``, ...), the
        exported program itself, which fault injection runs on its exact general path."""
        if self.kind != "Hugging Face":
            return self.module
        shape = tuple(int(d) for d in input_shape)
        if dtype is None:
            takes_tokens = getattr(getattr(self.module, "model", None), "main_input_name", None) == "input_ids"
            dtype = torch.long if takes_tokens else torch.float32
        if (shape, dtype) not in self._exported:
            self._exported[(shape, dtype)] = _export(self.module, shape, dtype, self.path)
        return self._exported[(shape, dtype)]


_first_line = models._first_line  # "Type: first line of the message"


def load_model(spec: str | os.PathLike[str], *, architecture: str | None = None,
               architecture_args: Any = None, trust_pickle: bool = False,
               cache_dir: str | os.PathLike[str] | None = None) -> LoadedModel:
    """Load a built-in model by name or a model file/folder (see the module docstring)."""
    text = os.fspath(spec)
    if text in models.names():
        if architecture is not None or architecture_args is not None:
            raise HwrelError(f"model '{text}' is built in: --architecture / --architecture-args "
                             "are for state-dict and .safetensors files")
        ref = models.load(text, cache_dir=cache_dir)
        return LoadedModel(ref.module, ref.name, "built-in", None, ref, tuple(ref.input_shape))
    path = Path(text)
    if not path.exists():
        raise HwrelError(f"model '{text}': neither a built-in model ({', '.join(models.names())}) "
                         "nor an existing file or folder")
    if architecture_args is not None and architecture is None:
        raise HwrelError(f"model {path}: --architecture-args needs --architecture")
    if path.is_dir():
        return _load_hf_folder(path, architecture, architecture_args)
    if path.suffix == ".pt2":
        return _load_export(path)
    if path.suffix == ".safetensors":
        state = _read_safetensors(path)
        return _into_architecture(path, state, "safetensors", architecture, architecture_args)
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        return LoadedModel(obj.eval(), path.stem, "pickle", path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not (isinstance(obj, Mapping) and obj and
            all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        raise HwrelError(f"model file {path}: neither an nn.Module nor a state dict "
                         f"(got {type(obj).__name__})")
    return _into_architecture(path, dict(obj), "state dict", architecture, architecture_args)


# ---------------------------------------------------------------------------------- file formats

def modules_from_export(gm: nn.Module, where: str) -> nn.Module:
    """The exported program ``gm`` (an fx graph of aten calls) as an fx graph of the equivalent
    ``nn`` modules (``nn.Linear``, ``nn.Conv2d``, ``nn.BatchNorm2d``, activations, pooling),
    computing exactly the same outputs (the weights are the program's, copied), so that everything
    that works on modules (Brevitas quantization, fault injection) works on it. Each aten call is
    mapped by the rules :mod:`hwrel.extract_export` uses; anything else is an error naming it."""
    import operator

    import torch.fx as fx

    from hwrel.errors import UnsupportedLayerError
    from hwrel.extract_export import _aten_module, check_noop_slice, constants, identities

    aten = torch.ops.aten
    graph, root = fx.Graph(), nn.Module()
    env: dict[fx.Node, Any] = {}
    out = None
    consts = constants(gm)
    with torch.no_grad():
        for n in gm.graph.nodes:
            if n in consts:
                continue  # weights and what is computed from them alone (Brevitas weight quantization)
            if n.op == "placeholder":
                env[n] = graph.placeholder(n.name)
            elif n.op in ("get_attr", "call_module"):
                continue  # weights (copied into the modules) and export's input guards
            elif n.op == "output":
                arg = n.args[0]
                out = env[arg[0] if isinstance(arg, (tuple, list)) else arg]
            elif n.target is aten.sym_size.int:
                continue  # the batch size: reshapes below keep the batch dimension instead
            elif n.target is operator.getitem:
                env[n] = env[n.args[0]]  # the first output of a batch-norm variant
            elif n.target in identities():
                env[n] = env[n.args[0]]
            elif n.target is aten.slice.Tensor:
                val = n.args[0].meta.get("val")
                if not isinstance(val, torch.Tensor):
                    raise UnsupportedLayerError(f"{where}: operation {n.name} (aten.slice.Tensor) on an input "
                                                "of unknown shape")
                check_noop_slice(n, val)
                env[n] = env[n.args[0]]
            elif n.target in (aten.add.Tensor,):
                ins = [env[a] for a in n.args if isinstance(a, fx.Node)]
                if len(ins) != 2 or n.kwargs.get("alpha", 1) != 1:
                    raise UnsupportedLayerError(f"{where}: operation {n.name} (aten.add): only the "
                                                "sum of two tensors is supported")
                env[n] = graph.call_function(operator.add, tuple(ins))
            elif n.target in (aten.view.default, aten.reshape.default):
                rest = [int(d) for d in list(n.args[1])[1:]]
                src = env[n.args[0]]
                env[n] = (graph.call_function(torch.flatten, (src, 1)) if rest == [-1]
                          else graph.call_method("reshape", (src, -1, *rest)))
            else:
                module, src = _aten_module(gm, n, consts)
                if module is None:
                    raise UnsupportedLayerError(f"{where}: operation {n.name} ({n.target}) is not "
                                                "supported")
                name = f"{n.name}"
                root.add_module(name, module.eval())
                env[n] = graph.call_module(name, (env[src],))
    if out is None:
        raise UnsupportedLayerError(f"{where}: the program has no output")
    graph.output(out)
    return fx.GraphModule(root, graph).eval()


def _load_export(path: Path) -> LoadedModel:
    if not zipfile.is_zipfile(path):
        raise HwrelError(f"model file {path}: not a torch.export .pt2 archive")
    try:
        with warnings.catch_warnings():  # torch's own deprecation notices while reading programs
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.export.load(path)
    except Exception as exc:
        raise HwrelError(f"model file {path}: not a readable torch.export program "
                         f"({_first_line(exc)})") from None
    shapes = [tuple(n.meta["val"].shape) for n in program.graph.nodes
              if n.op == "placeholder" and n.name in program.graph_signature.user_inputs
              and isinstance(n.meta.get("val"), torch.Tensor)]
    shape = None
    if len(shapes) == 1 and all(isinstance(d, int) for d in shapes[0][1:]):
        shape = tuple(int(d) for d in shapes[0][1:])
    from hwrel.errors import UnsupportedLayerError

    try:
        module = modules_from_export(program.run_decompositions({}).module(), f"model file {path}")
    except UnsupportedLayerError:
        # no module rule for some operation: the program itself, which fault injection runs
        # (its exact general path); the bounds then name the operation they do not support
        module = program.module()
    return LoadedModel(module, path.stem, "torch.export", path, None, shape)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise HwrelError(f"model file {path}: not a readable .safetensors file "
                         f"({_first_line(exc)})") from None
    if not state:
        raise HwrelError(f"model file {path}: holds no tensors")
    return state


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names the rejected class as "GLOBAL <name>"; anything else is a corrupt file.
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found is None:
            raise HwrelError(f"model file {path}: unreadable (not a torch.save file, or corrupt)"
                             ) from None
        if not trust_pickle:
            raise HwrelError(
                f"model file {path}: holds pickled Python objects ({found.group(1)}), which can "
                "run arbitrary code when loaded; pass trust_pickle=True (CLI: --trust-pickle) "
                "only if you trust it, or save a state_dict, a .safetensors or a torch.export "
                ".pt2") from None
        try:
            with _cwd_importable():  # the pickle names the user's classes, importable from here
                return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise HwrelError(f"model file {path}: cannot unpickle ({_first_line(exc2)})") from None
    except Exception as exc:
        raise HwrelError(f"model file {path}: unreadable ({_first_line(exc)})") from None


# ---------------------------------------------------------------------------------- architectures

def parse_architecture_args(value: Any) -> tuple[list, dict]:
    """``(args, kwargs)`` from a JSON text (or an already parsed value): an object gives keyword
    arguments, a list positional ones, None neither."""
    if value is None:
        return [], {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise HwrelError(f"--architecture-args must be JSON, e.g. '{{\"hidden\": 16}}' "
                             f"({exc.msg} at character {exc.pos})") from None
    if isinstance(value, Mapping):
        return [], dict(value)
    if isinstance(value, (list, tuple)):
        return list(value), {}
    raise HwrelError(f"--architecture-args must be a JSON object (keyword arguments) or list "
                     f"(positional ones), got {type(value).__name__}")


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    # `hwrel` is a console script: unlike `python -m`, the current folder is not on sys.path, yet
    # `mypackage.models:Net` run from the project folder is what a user expects to work.
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def resolve_class(architecture: str) -> type:
    """The class named ``package.module:ClassName`` or ``path/to/file.py:ClassName``."""
    where, _, cls_name = architecture.rpartition(":")
    if not where or not cls_name or not cls_name.isidentifier():
        raise HwrelError(f"--architecture '{architecture}': neither a built-in architecture "
                         f"({', '.join(models.names())}) nor package.module:ClassName")
    try:
        if where.endswith(".py"):
            file = Path(where)
            if not file.is_file():
                raise HwrelError(f"--architecture '{architecture}': no file {file}")
            spec = importlib.util.spec_from_file_location(f"hwrel_user_{file.stem}", file)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            with _cwd_importable():
                module = importlib.import_module(where)
    except HwrelError:
        raise
    except Exception as exc:  # ImportError, or anything the user's module raises on import
        raise HwrelError(f"--architecture '{architecture}': cannot import {where} "
                         f"({_first_line(exc)})") from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        known = sorted(n for n, v in vars(module).items()
                       if isinstance(v, type) and issubclass(v, nn.Module) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise HwrelError(f"--architecture '{architecture}': {where} has no class '{cls_name}'"
                         + (f" (its nn.Module classes: {', '.join(known)})" if known else ""))
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise HwrelError(f"--architecture '{architecture}': {cls_name} is not an nn.Module class")
    return cls


def build_architecture(architecture: str, architecture_args: Any = None) -> nn.Module:
    """A fresh module of a built-in architecture or of the user's class (its random init does
    not touch the global RNG)."""
    if architecture in models.names():
        if architecture_args is not None:
            raise HwrelError(f"--architecture-args: the built-in architecture '{architecture}' "
                             "takes no arguments")
        recipe = models._recipe(architecture)
        return models._build(recipe.factory, recipe.seed)
    cls = resolve_class(architecture)
    args, kwargs = parse_architecture_args(architecture_args)
    try:
        with torch.random.fork_rng(devices=[]):
            return cls(*args, **kwargs)
    except Exception as exc:
        raise HwrelError(f"--architecture '{architecture}': constructing it with "
                         f"--architecture-args {json.dumps(kwargs or args)} failed "
                         f"({_first_line(exc)})") from None


def _mismatch(module: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """What does not fit, in one short phrase."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    sizes = [f"{k} is {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if extra:
        parts.append(f"unexpected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
    if sizes:
        parts.append(sizes[0] + (f" (and {len(sizes) - 1} more)" if len(sizes) > 1 else ""))
    return "; ".join(parts)


def _into_architecture(path: Path, state: dict[str, torch.Tensor], kind: str,
                       architecture: str | None, architecture_args: Any) -> LoadedModel:
    if architecture is None:
        raise HwrelError(f"model file {path}: is a {kind} (weights only); say which architecture "
                         f"it fits with --architecture: a built-in one ({', '.join(models.names())})"
                         " or your class as package.module:ClassName")
    module = build_architecture(architecture, architecture_args)
    problem = _mismatch(module, state)
    if problem:
        raise HwrelError(f"model file {path}: does not fit architecture '{architecture}' "
                         f"({problem})")
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise HwrelError(f"model file {path}: does not fit architecture '{architecture}' "
                         f"({_first_line(exc)})") from None
    shape = None
    if architecture in models.names():
        shape = tuple(models._recipe(architecture).input_shape)
    return LoadedModel(module.eval(), path.stem, kind, path, None, shape)


# ---------------------------------------------------------------------------------- Hugging Face

class HuggingFaceLogits(nn.Module):
    """A ``transformers`` model as a plain tensor -> logits module (its first positional input,
    e.g. ``pixel_values``; the ``logits`` field of its output)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if hasattr(out, "logits"):
            return out.logits
        return out[0] if isinstance(out, (tuple, list)) else out


def _load_hf_folder(path: Path, architecture: str | None, architecture_args: Any) -> LoadedModel:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise HwrelError(f"model folder {path}: not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HwrelError(f"model folder {path}: config.json is not valid JSON "
                         f"({_first_line(exc)})") from None
    if not isinstance(config, dict):
        raise HwrelError(f"model folder {path}: config.json is not a JSON object")
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        raise HwrelError(f"model folder {path}: no model.safetensors (hwrel reads Hugging Face "
                         "weights as safetensors only, never pickles)")
    if architecture_args is not None:
        raise HwrelError(f"model folder {path}: --architecture-args does not apply (config.json "
                         "holds the model's settings)")
    try:
        import transformers
    except ImportError:
        raise HwrelError(f"model folder {path}: reading Hugging Face folders needs the "
                         "transformers package: pip install 'hwrel[hf]'") from None
    if architecture is not None:
        cls: Any = resolve_class(architecture)
        if not hasattr(cls, "from_pretrained"):
            raise HwrelError(f"--architecture '{architecture}': not a transformers model class "
                             "(no from_pretrained) for the folder {path}")
    else:
        names = config.get("architectures") or []
        name = names[0] if names else None
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if cls is None:
            raise HwrelError(f"model folder {path}: config.json names architecture {name!r}, "
                             "which is not a transformers class; name your class with "
                             "--architecture package.module:ClassName")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        with torch.random.fork_rng(devices=[]):
            model = cls.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                        trust_remote_code=False)
    except Exception as exc:
        raise HwrelError(f"model folder {path}: transformers cannot load it "
                         f"({_first_line(exc)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    shape = None
    channels, size = config.get("num_channels"), config.get("image_size")
    if isinstance(channels, int) and isinstance(size, int):
        shape = (channels, size, size)
    return LoadedModel(HuggingFaceLogits(model).eval(), path.name, "Hugging Face", path, None,
                       shape)


def _export(module: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, path: Path | None) -> nn.Module:
    from hwrel.errors import UnsupportedLayerError

    example = torch.zeros(2, *shape, dtype=dtype)
    try:
        program = torch.export.export(module, (example,),
                                      dynamic_shapes=({0: torch.export.Dim("batch")},))
        # Functional form: in-place ops (e.g. `hidden += residual`) become plain ones.
        program = program.run_decompositions({})
    except Exception as exc:
        raise HwrelError(f"model folder {path}: cannot export it for inputs of shape {shape} "
                         f"({_first_line(exc)})") from None
    try:
        return modules_from_export(program.module(), f"model folder {path}")
    except UnsupportedLayerError:
        return program.module()  # as for a .pt2 file: the bounds then name the operation


__all__ = ["KINDS", "HuggingFaceLogits", "LoadedModel", "build_architecture", "load_model", "modules_from_export",
           "parse_architecture_args", "resolve_class"]
