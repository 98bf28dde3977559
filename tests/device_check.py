"""Catch device mixing without a GPU: tensors that report ``cuda`` but hold CPU data.

``OnDevice`` is a wrapper tensor whose ``.device`` is ``cuda:0`` while its data lives on the CPU, and
``SimulatedCuda`` is a ``TorchFunctionMode`` that, for every torch call touching such a tensor (or
asking for a CUDA device), (1) applies the device rules a real CUDA build enforces — tensor arguments
on different devices raise ``DeviceMismatch``, except what CUDA allows: a 0-dim CPU tensor beside CUDA
tensors, CPU index tensors, cross-device copies — (2) runs the call on the CPU data, and (3) wraps the
results as ``OnDevice`` again. ``x.to("cuda")``, ``torch.zeros(..., device="cuda")`` and the like give
``OnDevice`` tensors; ``.cpu()`` / ``.to("cpu")`` give plain ones. Our own ops (``c2t_fast::*``) get no
exemption: every tensor argument must be on one device, as their CUDA kernels require.

So code that would mix devices on a GPU raises here, and code that keeps its tensors on the device it
was given runs to the end with CPU results a test can compare to a plain CPU run. Host syncs
(``.item()``, ``.tolist()``) are allowed, as on a GPU. Not simulated: ``torch.Generator("cuda")``,
``torch.cuda.*`` calls, CUDA streams.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)


class DeviceMismatch(RuntimeError):
    pass


class OnDevice(torch.Tensor):
    """CPU data behind a tensor that says it is on ``cuda:0``."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        assert not isinstance(elem, OnDevice) and elem.device.type == "cpu", type(elem)
        r = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                device=CUDA, requires_grad=elem.requires_grad)
        r.elem = elem
        return r

    def __repr__(self):
        return f"OnDevice({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Calls that reach the dispatcher with a wrapper (bypassing SimulatedCuda, e.g. from C++ module
        # internals) run on the CPU data; the checks live in SimulatedCuda.
        out = func(*_unwrap(args), **_unwrap(kwargs or {}))
        return _wrap(out) if not func._schema.is_mutable else args[0]


def _unwrap(x):
    return tree_map(lambda t: t.elem if isinstance(t, OnDevice) else t, x)


def _wrap(x):
    return tree_map(lambda t: OnDevice(t) if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice)
                    and t.device.type == "cpu" else t, x)


def _device_of(t: torch.Tensor) -> str:
    return "cuda" if isinstance(t, OnDevice) else t.device.type


def _is_cuda(dev) -> bool:
    if isinstance(dev, (str, torch.device)):
        return torch.device(dev).type == "cuda"
    return False


def _target_device(func, args, kwargs):
    """The device a call asks for (``device=``, ``.to(dev)``, ``.cuda()``, ``.cpu()``), or None."""
    name = getattr(func, "__name__", "")
    if "device" in kwargs and kwargs["device"] is not None:
        return torch.device(kwargs["device"])
    if name == "cuda":
        return CUDA
    if name == "cpu":
        return torch.device("cpu")
    if name == "to":
        for a in args[1:]:
            if isinstance(a, (str, torch.device)):
                return torch.device(a)
            if isinstance(a, torch.Tensor):  # .to(other): other's device
                return CUDA if isinstance(a, OnDevice) else a.device
    return None


_INDEXING = {"__getitem__", "__setitem__", "index_select", "gather", "index_put_", "index_put", "index_fill_",
             "index_copy_", "index_add_", "take", "take_along_dim"}
_CROSS_DEVICE = {"to", "cuda", "cpu", "copy_", "item", "tolist", "numpy", "__len__", "__bool__", "__int__",
                 "__float__", "__index__", "data_ptr", "element_size", "dim", "size", "stride", "numel",
                 "storage_offset", "is_contiguous", "__format__", "__repr__", "__reduce_ex__", "_has_compatible_shallow_copy_type"}


class SimulatedCuda(TorchFunctionMode):
    """Within this mode, ``OnDevice`` tensors behave like CUDA tensors (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.calls_checked = 0

    def __enter__(self):
        # Tensor.to("cuda") initialises CUDA before anything else; there is none to initialise here.
        import torch.cuda

        self._lazy_init, torch.cuda._lazy_init = torch.cuda._lazy_init, lambda: None
        return super().__enter__()

    def __exit__(self, *exc):
        import torch.cuda

        torch.cuda._lazy_init = self._lazy_init
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name == "__get__":  # .device, .shape, .dtype...: the wrapper's own metadata
            return func(*args, **kwargs)
        target = _target_device(func, args, kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if target is None and not any(isinstance(t, OnDevice) for t in tensors):
            return func(*args, **kwargs)
        self.calls_checked += 1
        self._check(func, name, args, tensors)
        if target is not None and target.type == "cuda":
            kwargs = {**kwargs, "device": "cpu"} if "device" in kwargs else kwargs
            if name in ("to", "cuda"):
                src = args[0].elem if isinstance(args[0], OnDevice) else args[0]
                rest = [a for a in args[1:] if not isinstance(a, (str, torch.device, torch.Tensor))]
                dtype = kwargs.get("dtype", next((a for a in rest if isinstance(a, torch.dtype)), None))
                out = src.to(dtype) if dtype is not None else src
                if isinstance(args[0], OnDevice) and out is src:
                    return args[0]
                return OnDevice(out.clone() if out is src else out)
        if name == "cpu" or (name == "to" and target is not None and target.type == "cpu"):
            src = args[0].elem if isinstance(args[0], OnDevice) else args[0]
            return src.to(*[a for a in args[1:] if not isinstance(a, (str, torch.device))],
                          **{k: v for k, v in kwargs.items() if k != "device"})
        out = func(*_unwrap(args), **_unwrap(kwargs))
        if name.endswith("_") and not name.startswith("__") or name == "__setitem__":
            return args[0] if name != "__setitem__" else None  # in place: the wrapper itself
        on_cuda = (target is not None and target.type == "cuda") or (
            isinstance(args[0], OnDevice) if name in _INDEXING and args else any(isinstance(t, OnDevice)
                                                                                for t in tensors))
        return _wrap(out) if on_cuda else out

    @staticmethod
    def _check(func, name, args, tensors) -> None:
        if name in _CROSS_DEVICE or len(tensors) < 2:
            return
        ours = "c2t_fast" in str(func) or "wisca_fast" in str(func)
        if name in _INDEXING and args and isinstance(args[0], torch.Tensor):
            tensors = [args[0]] + [t for t in tensors[1:] if t.is_floating_point()]  # CPU indices are fine
        devs = {_device_of(t) for t in tensors if ours or not (t.dim() == 0 and _device_of(t) == "cpu")}
        if len(devs) > 1:
            shapes = [(tuple(t.shape), _device_of(t)) for t in tensors]
            raise DeviceMismatch(f"{func if ours else getattr(func, '__qualname__', func)} would mix devices on a GPU: {shapes}")


def to_simulated_cuda(module: torch.nn.Module) -> torch.nn.Module:
    """Move ``module``'s parameters and buffers "to the GPU" (OnDevice), in place."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and not isinstance(p, OnDevice):  # shared modules are moved once
                m._parameters[name] = torch.nn.Parameter(OnDevice(p.detach()), requires_grad=False)
        for name, b in list(m._buffers.items()):
            if b is not None and not isinstance(b, OnDevice):
                m._buffers[name] = OnDevice(b)
    return module


def to_cpu(x):
    """Plain CPU tensors again (for comparisons outside the mode)."""
    return _unwrap(x)
