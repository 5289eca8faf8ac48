"""A guard around the device work of one step: nothing in it may make the device wait for the host.

A GPU step that reads a device tensor on the host (`.item()`, `float()`, `.tolist()`) or builds a
tensor from Python numbers on the device (`torch.tensor([...], device=cuda)` is a blocking copy
from pageable memory) stalls the stream. Two checks share one switch (`check_syncs`):

- on CUDA, `torch.cuda.set_sync_debug_mode("error")` makes any such sync raise;
- everywhere (the CPU included, where torch has no sync debug mode), a recorder catches the
  Python-side causes in salmae's own code: tensors built from Python lists or scalars
  (`torch.tensor`, `torch.as_tensor`), factories and generators made without `device=` (they
  land on the CPU and must be copied over), and tensors read on the host (`.item()`,
  `.tolist()`, `int()`, `bool()`, `float()`, `.cpu()`, `.numpy()`). It patches those while the
  block runs and counts only calls made from salmae's files (library internals, such as an
  optimizer creating its step counter, are not ours to change). It is a proxy: what only CUDA
  shows (a kernel that syncs inside a library) is left to the first check.

The loader runs outside the guarded block: building tensors from lists there is host work.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

import torch

from salmae.pipeline.errors import SalmaeError

# salmae's folders as imported (also through a link, as `make gpu-check` imports it) and as resolved
_OURS = tuple({str(base / sub) for base in (Path(__file__).parent.parent, Path(__file__).resolve().parent.parent)
               for sub in ("pipeline", "stages")})
_CREATE = ("tensor", "as_tensor")
_FACTORIES = ("rand", "randn", "randint", "zeros", "ones", "full", "empty", "arange", "eye")
_READ = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


def _caller_is_ours() -> str | None:
    """'file:line' of the nearest salmae frame above the patched call, if the call came from salmae."""
    frame = sys._getframe(2)
    if frame is not None and frame.f_code.co_filename.startswith(_OURS) \
            and not frame.f_code.co_filename.endswith("host_syncs.py"):
        return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
    return None


@contextlib.contextmanager
def record_host_syncs() -> Iterator[list[str]]:
    """Record (into the yielded list) each call made from salmae's code that would sync a GPU step:
    `torch.tensor`/`torch.as_tensor` of Python data, and a tensor read on the host."""
    found: list[str] = []
    saved = {name: getattr(torch, name) for name in (*_CREATE, *_FACTORIES, "Generator")}
    saved_reads = {name: getattr(torch.Tensor, name) for name in _READ}

    def creator(name, original):
        def create(data, *args, **kwargs):
            if not isinstance(data, torch.Tensor):
                where = _caller_is_ours()
                if where:
                    found.append(f"torch.{name} of Python data at {where}")
            return original(data, *args, **kwargs)
        return create

    def factory(name, original):
        def make(*args, **kwargs):
            if "device" not in kwargs:
                where = _caller_is_ours()
                if where:
                    found.append(f"torch.{name} without device= at {where}")
            return original(*args, **kwargs)
        return make

    def reader(name, original):
        def read(self, *args, **kwargs):
            where = _caller_is_ours()
            if where:
                found.append(f"Tensor.{name} at {where}")
            return original(self, *args, **kwargs)
        return read

    class Generator(saved["Generator"]):
        def __new__(cls, *args, **kwargs):
            if not args and "device" not in kwargs:
                where = _caller_is_ours()
                if where:
                    found.append(f"torch.Generator without device= at {where}")
            return saved["Generator"](*args, **kwargs)

    for name in _CREATE:
        setattr(torch, name, creator(name, saved[name]))
    for name in _FACTORIES:
        setattr(torch, name, factory(name, saved[name]))
    torch.Generator = Generator
    for name, original in saved_reads.items():
        setattr(torch.Tensor, name, reader(name, original))
    try:
        yield found
    finally:
        for name, original in saved.items():
            setattr(torch, name, original)
        for name, original in saved_reads.items():
            setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def no_host_syncs(device: torch.device, enabled: bool, where: str, record: bool = True) -> Iterator[None]:
    """With `enabled`: a host sync inside the block (CUDA: any; everywhere: the recorder's proxies,
    unless `record` is off, e.g. around a compiled model) is a SalmaeError naming `where`."""
    if not enabled:
        yield
        return
    cuda = device.type == "cuda"
    with contextlib.ExitStack() as stack:
        found = stack.enter_context(record_host_syncs()) if record else []
        if cuda:
            torch.cuda.set_sync_debug_mode("error")
            stack.callback(torch.cuda.set_sync_debug_mode, "default")
        try:
            yield
        except RuntimeError as e:
            if not cuda or "synchroniz" not in str(e).lower():
                raise
            raise SalmaeError(f"{where} waited for the GPU ({e}); this is a salmae bug: please report it "
                              "with the line above") from e
    if found:
        raise SalmaeError(f"{where} would wait for the GPU: {'; '.join(sorted(set(found)))}; this is a salmae bug: "
                          "please report it with the line above")
