"""Run-time compiled CUDA C++ kernels: NVRTC to PTX, the driver API to load and launch (ctypes only).

No nvcc, no build step and no extension module: what the GPU image already has (the NVRTC library that
ships with PyTorch's CUDA wheels, and the driver). Launches go to PyTorch's current stream, so they are
ordered with the Triton kernels around them and can be captured in CUDA graphs.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import hashlib
import os
import sys

import torch

_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


class RtcError(RuntimeError):
    """NVRTC or driver failure (the message carries the compiler log or the CUDA error name)."""


def _candidates_nvrtc() -> list[str]:
    names = []
    for base in sys.path:
        names += sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "lib", "libnvrtc.so*")), reverse=True)
        names += sorted(glob.glob(os.path.join(base, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*")), reverse=True)
    found = ctypes.util.find_library("nvrtc")
    if found:
        names.append(found)
    return [n for n in names if "builtins" not in n and ".alt." not in n]


@functools.lru_cache(maxsize=None)
def nvrtc() -> ctypes.CDLL:
    try:  # PyTorch's own loader where it has one (it knows the wheel layout of its CUDA version)
        from torch.cuda._utils import _get_nvrtc_library  # type: ignore[attr-defined]

        return _get_nvrtc_library()
    except Exception:  # noqa: BLE001 - fall back to a search
        pass
    errors = []
    for name in _candidates_nvrtc():
        try:
            return ctypes.CDLL(name)
        except OSError as exc:
            errors.append(f"{name}: {exc}")
    raise RtcError("libnvrtc not found (it ships with PyTorch's CUDA wheels as nvidia-cuda-nvrtc); "
                   + "; ".join(errors))


@functools.lru_cache(maxsize=None)
def libcuda() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise RtcError(f"the CUDA driver library is not loadable: {exc}") from exc


def _check(res: int, what: str) -> None:
    if res != 0:
        name = ctypes.c_char_p()
        libcuda().cuGetErrorName(res, ctypes.byref(name))
        raise RtcError(f"{what} failed: CUDA error {res} ({(name.value or b'?').decode()})")


def compile_ptx(source: str, name: str, arch: str, options: tuple[str, ...] = ()) -> bytes:
    """CUDA C++ source -> PTX for ``arch`` (e.g. "compute_90a")."""
    lib = nvrtc()
    prog = ctypes.c_void_p()
    res = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None, None)
    if res != 0:
        raise RtcError(f"nvrtcCreateProgram failed ({res})")
    try:
        opts = [f"--gpu-architecture={arch}", "-std=c++17", "--use_fast_math", *options]
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        res = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if res != 0:
            raise RtcError(f"NVRTC could not compile {name}:\n{log.value.decode(errors='replace')}")
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        ptx = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, ptx)
        return ptx.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


class DevicePointer(int):
    """A raw device address passed as a 64-bit kernel argument (e.g. pinned host memory mapped under UVA)."""


def mapped_pointer(t: torch.Tensor) -> DevicePointer:
    """The device address of pinned host tensor ``t`` (its mapping into the CUDA address space): what a kernel
    reads it through without a copy (zero-copy, over PCIe / C2C). The mapping is looked up for the start of ``t``'s
    storage (the allocation) and offset. Raises :class:`RtcError` when ``t`` is not mapped (not pinned, or pinned
    without the mapping)."""
    if t.is_cuda or not t.is_pinned():
        raise RtcError("mapped_pointer needs a pinned host tensor (torch.empty(..., pin_memory=True))")
    base = t.untyped_storage().data_ptr()
    ptr = ctypes.c_uint64()
    _check(libcuda().cuMemHostGetDevicePointer_v2(ctypes.byref(ptr), ctypes.c_void_p(base), 0),
           "cuMemHostGetDevicePointer (the pinned host tensor is not mapped into the device's address space)")
    return DevicePointer(ptr.value + (t.data_ptr() - base))


class RtcKernel:
    """One ``extern "C"`` kernel of a run-time compiled module, loaded on one device."""

    def __init__(self, source: str, name: str, device: torch.device, defines: dict[str, int],
                 max_dynamic_smem: int = 0):
        self.name = name
        self.device = device
        major, minor = torch.cuda.get_device_capability(device)
        arch = f"compute_{major}{minor}{'a' if major >= 9 else ''}"
        head = "".join(f"#define {k} {int(v)}\n" for k, v in sorted(defines.items()))
        self.ptx = compile_ptx(head + source, name, arch)
        cu = libcuda()
        with torch.cuda.device(device):
            torch.cuda.current_stream(device)  # the primary context exists and is current
            self.module = ctypes.c_void_p()
            _check(cu.cuModuleLoadData(ctypes.byref(self.module), ctypes.c_char_p(self.ptx)), "cuModuleLoadData")
            self.func = ctypes.c_void_p()
            _check(cu.cuModuleGetFunction(ctypes.byref(self.func), self.module, name.encode()), "cuModuleGetFunction")
            if max_dynamic_smem > 48 * 1024:
                _check(cu.cuFuncSetAttribute(self.func, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                             int(max_dynamic_smem)), "cuFuncSetAttribute(max dynamic smem)")
        self._index = device.index if device.index is not None else torch.cuda.current_device()
        self._slots: dict[int, tuple] = {}  # argument count -> (parameter values, pointers to them)
        self._launch = cu.cuLaunchKernel
        self.regs = self._attribute(4)  # CU_FUNC_ATTRIBUTE_NUM_REGS
        self.local_bytes = self._attribute(3)  # CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES (spills)

    def _attribute(self, attr: int) -> int:
        val = ctypes.c_int()
        _check(libcuda().cuFuncGetAttribute(ctypes.byref(val), attr, self.func), "cuFuncGetAttribute")
        return val.value

    def __call__(self, grid: tuple[int, int, int], block: int, smem: int, args: list) -> None:
        """Launch on PyTorch's current stream; args: tensors (pointers), None (null pointer), Python ints (C int).

        The host time matters (a decode step launches this once per layer, and the end-to-end step is host-bound;
        benchmarks/host_overhead.py): the parameter slots are allocated once per argument count and refilled."""
        n = len(args)
        slots = self._slots.get(n)
        if slots is None:
            vals = (ctypes.c_uint64 * n)()
            ptrs = (ctypes.c_void_p * n)(*[ctypes.addressof(vals) + 8 * i for i in range(n)])
            slots = self._slots[n] = (vals, ptrs)
        vals, ptrs = slots
        index = self._index
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                if a.get_device() != index:
                    raise RtcError(f"{self.name}: tensor on {a.device}, kernel loaded on {self.device}")
                vals[i] = a.data_ptr()
            elif a is None:  # a null pointer (an optional array)
                vals[i] = 0
            elif isinstance(a, DevicePointer):  # a raw 64-bit device address
                vals[i] = int(a)
            elif isinstance(a, int):
                vals[i] = a & 0xFFFFFFFF  # a C int: the kernel reads the low 4 bytes (little-endian)
            else:
                raise RtcError(f"{self.name}: unsupported argument type {type(a).__name__}")
        stream = ctypes.c_void_p(_raw_stream(index))
        _check(self._launch(self.func, int(grid[0]), int(grid[1]), int(grid[2]), int(block), 1, 1, int(smem),
                            stream, ptrs, None), f"launch of {self.name}")


def _raw_stream(index: int) -> int:
    """PyTorch's current stream on device ``index`` (the raw handle, without building a Stream object)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw(index) if raw is not None else torch.cuda.current_stream(index).cuda_stream


_CACHE: dict = {}


def load_kernel(source: str, name: str, device: torch.device, defines: dict[str, int],
                max_dynamic_smem: int = 0) -> RtcKernel:
    """Compiled once per (source, defines, device) and process."""
    key = (hashlib.sha1(source.encode()).hexdigest(), name, str(device), tuple(sorted(defines.items())),
           max_dynamic_smem)
    if key not in _CACHE:
        _CACHE[key] = RtcKernel(source, name, device, defines, max_dynamic_smem)
    return _CACHE[key]


__all__ = ["DevicePointer", "RtcError", "RtcKernel", "compile_ptx", "load_kernel", "mapped_pointer"]
