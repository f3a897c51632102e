"""Shared memory between processes on one host: tensors skip the wire.

An owner (the master towards its workers, a client towards the master) creates a region:
an anonymous memory file (memfd) for host tensors, a device allocation shared through CUDA
IPC for GPU tensors. The peer maps it once (AttachRegion); calls then carry offsets: the
owner writes the inputs in place, the peer writes the outputs back in place. A peer on
another host, or in another PID namespace, cannot map the region and is sent bytes, as is
a call that finds the region full.

Trust model. The unit of trust is the Unix user: a process of the same user can ptrace
ours, read and write our memory, so nothing here defends against it. Against everyone else:

- A region is a capability bound to the connection that attached it: the peer keys it by
  (`context.peer()` of the AttachRegion call, id), and a SharedTensor resolves only among
  the regions of the connection it arrives on. Ids are 128-bit random, and appear in no
  file name (a memfd has none in /dev/shm); an id alone grants nothing.
- A host region is offered as (pid, fd): the peer opens /proc/<pid>/fd/<fd>, which the
  kernel allows only to the owner's user (or root), and then checks on its own descriptor
  that the file is a regular file owned by its own effective uid, with no group or other
  permission bits, sealed against shrinking and growing (F_SEAL_SHRINK | F_SEAL_GROW) and at
  least as large as declared. The seals pin the size for the file's lifetime, so no access
  within the mapping can ever raise SIGBUS: a truncated file was how a region could kill a
  process. Last, the owner's nonce (>= 16 random bytes, sent only in AttachRegion) must be
  at offset 0: the file is the owner's region, not another of its files.
- A CUDA region carries, besides its IPC handle, a one-page host region holding the same
  nonce (the anchor): it proves the offer comes from a process of this host and user, which
  an IPC handle alone does not. The handle is opened here through the driver API (never
  with sizes or reference-counter files taken from the request), and the region's offset
  and size are checked against the allocation the handle really opens.

Only the owner allocates and frees blocks; SharedRegion has no lock (the master uses its
region on its event loop; the client SDK locks around it). Each in-flight call owns its
blocks until it ends, so calls never see each other's bytes.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import fcntl
import functools
import hmac
import logging
import math
import mmap
import os
import secrets
import stat
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import torch

from moe_serve.errors import InvalidRequestError, MoEError, Reason
from moe_serve.transport.wire import dtype_name, itemsize, pb_dtype, torch_dtype
from moe_serve.v1 import moe_pb2 as pb

log = logging.getLogger(__name__)

# A failed call's blocks stay reserved this long: its peer may still be writing its output
# there, and a reused block would hand those bytes to another call.
QUARANTINE_S = 60.0
# Tensors smaller than this travel as bytes even where a region is mapped: for them the
# bookkeeping and synchronisation of a block cost more than the copies they save.
MIN_SHARED_BYTES = 256 << 10
ALIGN = 256  # block offsets: any dtype's view lines up, and so do CUDA's vector loads
NONCE_BYTES = 32  # what owners write; peers accept MIN_NONCE_BYTES..ALIGN
MIN_NONCE_BYTES = 16  # 128 bits: not guessable
MAX_ID_CHARS = 64
# The name every region's memfd has (visible in /proc/<pid>/fd links): never an id.
MEMFD_NAME = "moe_serve-region"
ANCHOR_BYTES = 4096  # a CUDA region's host anchor: one page, the nonce at offset 0

# A peer keeps at most PER_PEER_REGIONS regions per connection (a client makes one; a
# newer one from the same connection replaces its oldest), and MAX_REGIONS in all. A full
# table never evicts another connection's region that was used in the last IDLE_EVICT_S:
# the newcomer is refused (attached=False) and sends bytes, so no client can push others
# off the fast path. Regions their owner closed (or whose owner exited) are dropped first.
PER_PEER_REGIONS = 4
MAX_REGIONS = 64
IDLE_EVICT_S = 300.0

_MFD_NOEXEC_SEAL = 0x0008  # Linux 6.3+; older kernels refuse it (EINVAL) and get no flag
# Linux's values (fcntl.h), spelled out: elsewhere fcntl lacks them, memfds do not exist, and
# regions fail to be made (SharedMemoryError: bytes are sent) rather than this module to import.
_F_ADD_SEALS, _F_GET_SEALS = 1033, 1034
_F_SEAL_SEAL, _F_SEAL_SHRINK, _F_SEAL_GROW = 0x1, 0x2, 0x4
_REQUIRED_SEALS = _F_SEAL_SHRINK | _F_SEAL_GROW
_MAX_FD = 1 << 30


class SharedMemoryError(MoEError):
    """A region cannot be created or mapped here; the reason says why."""


class RegionNotAttachedError(MoEError):
    """A call names a region this connection has not attached here (the peer restarted, the
    connection is new, or the region was never this caller's)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = Reason.REGION_NOT_ATTACHED  # the owner attaches again on it


class _Blocks:
    """First-fit allocator of ALIGN-aligned byte ranges in [ALIGN, size)."""

    def __init__(self, size: int) -> None:
        self._free: list[tuple[int, int]] = [(ALIGN, size - ALIGN)] if size > ALIGN else []
        self.used = 0

    def alloc(self, nbytes: int) -> int | None:
        need = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        for i, (start, length) in enumerate(self._free):
            if length >= need:
                if length == need:
                    del self._free[i]
                else:
                    self._free[i] = (start + need, length - need)
                self.used += need
                return start
        return None

    def free(self, start: int, nbytes: int) -> None:
        length = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        self.used -= length
        i = bisect.bisect(self._free, (start, length))
        if i < len(self._free) and start + length == self._free[i][0]:  # merge with next
            length += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:  # with previous
            start, length = self._free[i - 1][0], self._free[i - 1][1] + length
            i -= 1
            self._free.pop(i)
        self._free.insert(i, (start, length))


def _uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


# ------------------------------------------------------------------ host memory ---


class _HostMemory:
    """An owner's sealed memfd of `size` bytes, mode 0600, mapped; offered as (pid, fd)."""

    def __init__(self, size: int) -> None:
        try:
            try:
                fd = os.memfd_create(
                    MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | _MFD_NOEXEC_SEAL
                )
            except OSError:  # a kernel older than 6.3 does not know MFD_NOEXEC_SEAL
                fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except (OSError, AttributeError) as exc:
            raise SharedMemoryError(f"cannot create a memfd here: {exc}") from None
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, size)
            # Reserve every page now: a memory limit fails here with ENOSPC/ENOMEM, not on
            # first touch later.
            os.posix_fallocate(fd, 0, size)
            fcntl.fcntl(fd, _F_ADD_SEALS, _F_SEAL_SHRINK | _F_SEAL_GROW | _F_SEAL_SEAL)
            mapping = mmap.mmap(fd, size)
        except OSError as exc:
            os.close(fd)
            raise SharedMemoryError(
                f"cannot reserve {size} bytes of shared memory: {exc}"
            ) from None
        self.fd: int | None = fd  # kept open: peers open it through /proc/<pid>/fd/<fd>
        self.memory = torch.frombuffer(mapping, dtype=torch.uint8)

    def describe(self) -> pb.HostRegion:
        assert self.fd is not None, "describe() after close()"
        return pb.HostRegion(pid=os.getpid(), fd=self.fd)

    def close(self) -> None:
        """No new peer can open it; mappings (ours, peers') live until they are dropped."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass(frozen=True)
class _Source:
    """Where an owner offers a host region, and which file that was."""

    path: str  # /proc/<pid>/fd/<fd>
    dev: int
    ino: int

    def withdrawn(self) -> bool:
        """Whether the owner no longer offers the file: it closed the descriptor or exited
        (a descriptor number reused for another file has another inode)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != (self.dev, self.ino)


def _open_host(h: pb.HostRegion, size: int, field: str) -> tuple[torch.Tensor, _Source]:
    """Map `size` bytes of the region `h` names, after checking who owns it and that its
    size is pinned."""
    if h.pid <= 0 or h.fd >= _MAX_FD:
        raise SharedMemoryError(f"{field}: pid {h.pid}, fd {h.fd} name no open file")
    path = f"/proc/{h.pid}/fd/{h.fd}"
    try:
        # stat follows the link without opening: a device, socket or FIFO is refused
        # before an open could have side effects on it.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise SharedMemoryError(f"{field}: {path} is not a regular file")
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise SharedMemoryError(
            f"{field}: cannot open {path} here (another host or PID namespace, or another "
            f"user's process?): {exc.strerror}"
        ) from None
    try:
        st = os.fstat(fd)
        return _map_checked(fd, st, path, size, field), _Source(path, st.st_dev, st.st_ino)
    finally:
        os.close(fd)


def _map_checked(fd: int, st: os.stat_result, path: str, size: int, field: str) -> torch.Tensor:
    """Checked on our own descriptor, so what we map is what we checked."""
    if not stat.S_ISREG(st.st_mode):
        raise SharedMemoryError(f"{field}: {path} is not a regular file")
    if st.st_uid != os.geteuid():
        raise SharedMemoryError(
            f"{field}: the file is owned by uid {st.st_uid}, not by this process's uid "
            f"{os.geteuid()}"
        )
    if st.st_mode & 0o077:
        raise SharedMemoryError(
            f"{field}: mode {stat.S_IMODE(st.st_mode):04o} lets other users in; expected 0600"
        )
    try:
        seals = fcntl.fcntl(fd, _F_GET_SEALS)
    except OSError:
        seals = 0
    if seals & _REQUIRED_SEALS != _REQUIRED_SEALS:
        raise SharedMemoryError(
            f"{field}: the file's size is not sealed (F_SEAL_SHRINK | F_SEAL_GROW): "
            "expected a sealed memfd"
        )
    if st.st_size < size:
        raise SharedMemoryError(f"{field}: the file has {st.st_size} bytes, not {size}")
    return torch.frombuffer(mmap.mmap(fd, size), dtype=torch.uint8)


# ---------------------------------------------------------------- CUDA memory ---


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * 64)]  # raw bytes: NULs included


_CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1
_CUDA_ERROR_DEINITIALIZED = 4


class _CudaError(SharedMemoryError):
    """A CUDA driver call failed; `rc` is its CUresult."""

    def __init__(self, rc: int, message: str) -> None:
        super().__init__(message)
        self.rc = rc


class _Driver:
    """The few CUDA driver calls CUDA IPC needs, through ctypes (libcuda.so.1).

    Torch's own opener (`UntypedStorage._new_shared_cuda`) takes the storage size, offset
    and a reference-counter file name and offset from its caller, and writes to that file
    when the storage dies: none of that may come from a request. Here the handle alone is
    opened, and the allocation's real extent is asked of the driver."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise SharedMemoryError(f"no CUDA driver library here: {exc}") from None
        u64p, voidp = ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_void_p)
        self._sig("cuInit", ctypes.c_uint)
        self._sig("cuDeviceGet", ctypes.POINTER(ctypes.c_int), ctypes.c_int)
        self._sig("cuDevicePrimaryCtxRetain", voidp, ctypes.c_int)
        self._sig("cuCtxPushCurrent_v2", ctypes.c_void_p)
        self._sig("cuCtxPopCurrent_v2", voidp)
        self._sig("cuMemAlloc_v2", u64p, ctypes.c_size_t)
        self._sig("cuMemFree_v2", ctypes.c_uint64)
        self._sig("cuIpcGetMemHandle", ctypes.POINTER(_IpcHandle), ctypes.c_uint64)
        self._sig("cuIpcOpenMemHandle_v2", u64p, _IpcHandle, ctypes.c_uint)
        self._sig("cuIpcCloseMemHandle", ctypes.c_uint64)
        self._sig("cuMemGetAddressRange_v2", u64p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64)
        self.call("cuInit", 0)
        self._limbo: deque[tuple[float, int, int]] = deque()
        self._limbo_lock = threading.Lock()  # torch may free a tensor on any thread
        self._contexts: dict[int, ctypes.c_void_p] = {}

    def _sig(self, name: str, *argtypes: object) -> None:
        fn = getattr(self.lib, name)
        fn.argtypes, fn.restype = list(argtypes), ctypes.c_int

    def call(self, name: str, *args: object) -> None:
        rc = getattr(self.lib, name)(*args)
        if rc != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorName(rc, ctypes.byref(text))
            raise _CudaError(rc, f"{name} failed: CUDA error {rc} ({(text.value or b'').decode()})")

    @contextlib.contextmanager
    def context(self, index: int) -> Iterator[None]:
        """Device `index`'s primary context (torch's) current on this thread. It is retained
        once, for the process's lifetime: torch's runtime may not hold it yet, and releasing
        the last reference would destroy it with every allocation made in it."""
        with self._limbo_lock:
            ctx = self._contexts.get(index)
            if ctx is None:
                dev, ctx = ctypes.c_int(), ctypes.c_void_p()
                self.call("cuDeviceGet", ctypes.byref(dev), index)
                self.call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
                self._contexts[index] = ctx
        self.call("cuCtxPushCurrent_v2", ctx)
        try:
            yield
        finally:
            self.call("cuCtxPopCurrent_v2", ctypes.byref(ctypes.c_void_p()))

    def alloc(self, index: int, size: int) -> tuple[int, bytes]:
        """A fresh allocation of `size` bytes on device `index` -> (pointer, IPC handle)."""
        self.free_retired()
        ptr, handle = ctypes.c_uint64(), _IpcHandle()
        with self.context(index):
            self.call("cuMemAlloc_v2", ctypes.byref(ptr), size)
            try:
                self.call("cuIpcGetMemHandle", ctypes.byref(handle), ptr)
            except SharedMemoryError:
                self.call("cuMemFree_v2", ptr)
                raise
        return ptr.value, ctypes.string_at(ctypes.addressof(handle), 64)

    def retire(self, index: int, ptr: int) -> None:
        """Free an allocation of ours QUARANTINE_S from now: a peer may still write into it
        for a call that timed out here, and CUDA IPC keeps no count of its mappings (torch's
        own sharing keeps one in a shared file)."""
        with self._limbo_lock:
            self._limbo.append((time.monotonic() + QUARANTINE_S, index, ptr))
        self.free_retired()

    def free_retired(self) -> None:
        """Free the retired allocations whose quarantine is over."""
        now, due = time.monotonic(), []
        with self._limbo_lock:
            while self._limbo and self._limbo[0][0] <= now:
                due.append(self._limbo.popleft())
        for _, index, ptr in due:
            self._quiet(index, "cuMemFree_v2", ptr)

    def _quiet(self, index: int, name: str, ptr: int) -> None:
        """A release call; at process exit the driver may be gone already, and then so is
        the memory."""
        try:
            with self.context(index):
                self.call(name, ptr)
        except _CudaError as exc:
            if exc.rc != _CUDA_ERROR_DEINITIALIZED:
                raise

    def open(self, index: int, handle: bytes) -> tuple[int, int]:
        """Open an IPC handle in device `index`'s context -> (pointer, bytes of the whole
        allocation from that pointer), as the driver knows them."""
        h, ptr = _IpcHandle(), ctypes.c_uint64()
        ctypes.memmove(ctypes.addressof(h), handle, 64)
        base, length = ctypes.c_uint64(), ctypes.c_size_t()
        with self.context(index):
            self.call(
                "cuIpcOpenMemHandle_v2", ctypes.byref(ptr), h, _CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
            )
            try:
                self.call("cuMemGetAddressRange_v2", ctypes.byref(base), ctypes.byref(length), ptr)
            except SharedMemoryError:
                self.call("cuIpcCloseMemHandle", ptr)
                raise
        return ptr.value, base.value + length.value - ptr.value

    def close(self, index: int, ptr: int) -> None:
        """Unmap a peer allocation opened with `open`."""
        self._quiet(index, "cuIpcCloseMemHandle", ptr)


@functools.cache
def _driver() -> _Driver:
    return _Driver()


# A tensor over memory torch did not allocate, on a device we name (DLPack): the memory is
# released (`on_free`) when torch frees the last view. __cuda_array_interface__ would label
# the tensor with the GPU the memory sits on, not the one it is mapped for.
class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


_DL_DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _DLManaged(ctypes.Structure):
    _fields_ = [
        ("dl_tensor", _DLTensor),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", _DL_DELETER),
    ]


class _DLBlock(ctypes.Structure):
    _fields_ = [("managed", _DLManaged), ("shape", ctypes.c_int64)]


_DL_CPU, _DL_CUDA, _DL_UINT = 1, 2, 1


@functools.cache
def _dlpack() -> tuple[Callable[[int], None], dict[int, Callable[[], None]], Callable[..., int]]:
    """(deleter, on_free by block address, malloc). The blocks live in malloc'd memory and
    the deleter is never collected, so torch may free a tensor at any time, exit included."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]
    on_free: dict[int, Callable[[], None]] = {}
    free = libc.free

    def deleter(address: int) -> None:
        release = on_free.pop(address, None)
        free(address)
        if release is not None:
            try:
                release()
            except Exception:  # called from torch's C++, where it cannot propagate: logged
                log.exception("releasing shared memory failed")

    thunk = _DL_DELETER(deleter)
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(thunk))  # kept for the process's lifetime
    return thunk, on_free, libc.malloc


def _wrap(ptr: int, size: int, device: torch.device, on_free: Callable[[], None]) -> torch.Tensor:
    """uint8 tensor [size] over `ptr` on `device`; `on_free` runs once torch drops it."""
    thunk, registry, malloc = _dlpack()
    address = malloc(ctypes.sizeof(_DLBlock))
    if not address:
        raise MemoryError("malloc failed")
    block = _DLBlock.from_address(address)
    block.shape = size
    block.managed.dl_tensor = _DLTensor(
        ptr,
        _DLDevice(_DL_CUDA if device.type == "cuda" else _DL_CPU, device.index or 0),
        1,
        _DLDataType(_DL_UINT, 8, 1),
        ctypes.cast(address + _DLBlock.shape.offset, ctypes.POINTER(ctypes.c_int64)),
        None,
        0,
    )
    block.managed.manager_ctx = None
    block.managed.deleter = thunk
    registry[address] = on_free
    capsule_new = ctypes.pythonapi.PyCapsule_New
    capsule_new.restype = ctypes.py_object
    capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return torch.utils.dlpack.from_dlpack(capsule_new(address, b"dltensor", None))


# ---------------------------------------------------------------------- owner ---


class SharedRegion:
    """An owner's region on `device`: `size` bytes, an allocator, typed views."""

    def __init__(self, size: int, device: torch.device) -> None:
        if size <= ALIGN:
            raise SharedMemoryError(f"a region needs more than {ALIGN} bytes, got {size}")
        self.id, self.size, self.device = secrets.token_hex(16), size, device
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        if device.type == "cuda":
            self._anchor: _HostMemory | None = _HostMemory(ANCHOR_BYTES)
            self._anchor.memory[: len(self.nonce)].copy_(_as_tensor(self.nonce))
            self._host = None
            self.memory = self._cuda_memory(size, device)
        else:
            self._anchor, self._host = None, _HostMemory(size)
            self.memory = self._host.memory
        # The nonce goes in the first (never allocated) block; see AttachRegionRequest.nonce.
        self.memory[: len(self.nonce)].copy_(_as_tensor(self.nonce))
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a peer may read the nonce as soon as offered
        self._blocks = _Blocks(size)
        self._quarantine: deque[tuple[float, tuple[int, ...], tuple[int, ...]]] = deque()

    def _cuda_memory(self, size: int, device: torch.device) -> torch.Tensor:
        torch.cuda.init()  # torch's runtime owns the primary context we allocate in
        index = device.index if device.index is not None else torch.cuda.current_device()
        driver = _driver()
        ptr, self._handle = driver.alloc(index, size)
        self._device_uuid = _uuid(index)
        return _wrap(ptr, size, torch.device("cuda", index), lambda: driver.retire(index, ptr))

    def description(self) -> pb.AttachRegionRequest:
        """What a peer needs to map this region."""
        request = pb.AttachRegionRequest(id=self.id, size=self.size, nonce=self.nonce)
        if self._host is not None:
            request.host.CopyFrom(self._host.describe())
        else:
            assert self._anchor is not None
            request.cuda.CopyFrom(
                pb.CudaRegion(
                    device_uuid=self._device_uuid,
                    handle=self._handle,
                    offset=0,
                    anchor=self._anchor.describe(),
                )
            )
        return request

    @property
    def used(self) -> int:
        """Bytes in allocated blocks."""
        return self._blocks.used

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a fresh block of at least nbytes, or None when the region is full."""
        return self._blocks.alloc(nbytes)

    def free(self, offset: int, nbytes: int) -> None:
        """Give back a block from alloc."""
        self._blocks.free(offset, nbytes)

    def lease(self, *sizes: int) -> tuple[int, ...] | None:
        """One block per size, all or none (None when the region is full)."""
        now = time.monotonic()
        while self._quarantine and self._quarantine[0][0] <= now:
            _, quarantined, held = self._quarantine.popleft()
            for start, nbytes in zip(quarantined, held, strict=True):
                self.free(start, nbytes)
        offsets: list[int] = []
        for nbytes in sizes:
            offset = self.alloc(nbytes)
            if offset is None:
                for o, n in zip(offsets, sizes, strict=False):
                    self.free(o, n)
                return None
            offsets.append(offset)
        return tuple(offsets)

    def release(self, offsets: tuple[int, ...], sizes: tuple[int, ...], clean: bool) -> None:
        """Give back a lease. After a failed or timed-out call (`clean` False) the peer may
        still write into its blocks, so they are held for QUARANTINE_S before reuse."""
        if clean:
            for offset, nbytes in zip(offsets, sizes, strict=True):
                self.free(offset, nbytes)
        else:
            self._quarantine.append((time.monotonic() + QUARANTINE_S, offsets, sizes))

    def view(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor over the bytes at offset."""
        nbytes = itemsize(dtype) * math.prod(shape)
        return self.memory[offset : offset + nbytes].view(dtype).view(shape)

    def shared(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> pb.SharedTensor:
        """The SharedTensor message naming view(offset, dtype, shape)."""
        return pb.SharedTensor(region=self.id, offset=offset, dtype=pb_dtype(dtype), shape=shape)

    def close(self) -> None:
        """Stop offering the region: no new peer can map it (mapped peers keep their mapping
        until they drop it; the memory goes when the last mapping does)."""
        for part in (self._host, self._anchor):
            if part is not None:
                part.close()


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


# ----------------------------------------------------------------------- peer ---


class MappedRegion:
    """A peer's mapping of an owner's region, checked as the module docstring says."""

    def __init__(self, request: pb.AttachRegionRequest, near: torch.device | None) -> None:
        """Map the offered region. `near`: the CUDA device this process computes on, where
        CUDA memory is best mapped; None refuses CUDA regions."""
        if not 0 < len(request.id) <= MAX_ID_CHARS:
            raise SharedMemoryError(f"id: {len(request.id)} characters; expected 1..{MAX_ID_CHARS}")
        if not MIN_NONCE_BYTES <= len(request.nonce) <= ALIGN:
            raise SharedMemoryError(
                f"nonce: {len(request.nonce)} bytes; expected {MIN_NONCE_BYTES}..{ALIGN} random "
                "bytes that the owner wrote at offset 0"
            )
        if request.size <= ALIGN:
            raise SharedMemoryError(f"size: {request.size}; expected more than {ALIGN} bytes")
        self.id, self.size = request.id, request.size
        kind = request.WhichOneof("memory")
        if kind == "host":
            self.memory, self._source = _open_host(request.host, request.size, "host")
        elif kind == "cuda":
            if near is None:
                raise SharedMemoryError("this process computes on no CUDA device")
            # The anchor first: nothing of the CUDA description is used before the offer
            # is known to come from this host and user.
            anchor, self._source = _open_host(request.cuda.anchor, ANCHOR_BYTES, "cuda.anchor")
            _check_nonce(anchor, request.nonce, "cuda.anchor")
            self.memory = _map_cuda(request.cuda, request.size, near)
        else:
            raise SharedMemoryError("memory: neither host nor cuda is set")
        _check_nonce(self.memory, request.nonce, "nonce")

    def withdrawn(self) -> bool:
        """Whether the owner no longer offers the region (closed it, or exited): its
        mapping here only holds memory nobody will use."""
        return self._source.withdrawn()

    def view(
        self, t: pb.SharedTensor, field: str, dtypes: frozenset[torch.dtype], rank: int
    ) -> torch.Tensor:
        """The tensor `t` names, checked against this region; errors name `field`."""
        if t.region != self.id:
            raise RegionNotAttachedError(
                f"{field}.region: {t.region[:MAX_ID_CHARS]!r} is not mapped here"
            )
        return _checked_view(self.memory, self.size, t, field, dtypes, rank)


def _check_nonce(memory: torch.Tensor, nonce: bytes, field: str) -> None:
    found = bytes(memory[: len(nonce)].cpu().tolist())
    if not hmac.compare_digest(found, nonce):
        raise SharedMemoryError(f"{field}: the mapped memory does not hold the owner's nonce")


def _map_cuda(c: pb.CudaRegion, size: int, near: torch.device) -> torch.Tensor:
    if not torch.cuda.is_available():
        raise SharedMemoryError("CUDA is not available in this process")
    if len(c.handle) != ctypes.sizeof(_IpcHandle):
        raise SharedMemoryError(f"cuda.handle: {len(c.handle)} bytes; expected 64")
    owner = next((i for i in range(torch.cuda.device_count()) if _uuid(i) == c.device_uuid), None)
    if owner is None:
        raise SharedMemoryError(f"no GPU here has UUID {c.device_uuid} (another host?)")
    torch.cuda.init()
    driver = _driver()
    # Mapped into `near`'s address space (peer access, e.g. over NVLink), the memory is a
    # tensor on `near`: kernels there read and write it directly, and this process never
    # runs work in a context on the owner's GPU, where it would time-slice with that
    # GPU's own processes.
    near_index = near.index if near.index is not None else torch.cuda.current_device()
    tries = [owner]
    if near_index != owner and torch.cuda.can_device_access_peer(near_index, owner):
        tries.insert(0, near_index)
    for i, index in enumerate(tries):
        try:
            ptr, extent = driver.open(index, c.handle)
            break
        except SharedMemoryError as exc:
            if i == len(tries) - 1:
                raise SharedMemoryError(f"CUDA IPC open failed: {exc}") from None
            log.info("CUDA IPC open on cuda:%d failed (%s); mapping on cuda:%d", index, exc, owner)
    if c.offset + size > extent:
        driver.close(index, ptr)
        raise SharedMemoryError(
            f"cuda.offset: {c.offset} + size {size} bytes runs past the {extent}-byte "
            "allocation the handle opens"
        )
    return _wrap(
        ptr + c.offset, size, torch.device("cuda", index), lambda: driver.close(index, ptr)
    )


def _checked_view(
    memory: torch.Tensor,
    size: int,
    t: pb.SharedTensor,
    field: str,
    dtypes: frozenset[torch.dtype],
    rank: int,
) -> torch.Tensor:
    dtype = torch_dtype(t.dtype)
    if dtype not in dtypes:
        expected = sorted(dtype_name(d) for d in dtypes)
        raise InvalidRequestError(f"{field}.dtype", f"enum {t.dtype}; expected one of {expected}")
    if len(t.shape) != rank:  # before the shape becomes a tuple: a huge list costs nothing
        raise InvalidRequestError(f"{field}.shape", f"rank {len(t.shape)}; expected rank {rank}")
    shape = tuple(t.shape)
    if any(d < 0 for d in shape):
        raise InvalidRequestError(f"{field}.shape", f"{list(shape)}; expected rank {rank}")
    nbytes = itemsize(dtype) * math.prod(shape)
    if t.offset % ALIGN or t.offset < ALIGN or t.offset + nbytes > size:
        raise InvalidRequestError(
            f"{field}.offset",
            f"{t.offset} (+{nbytes} bytes) must be a multiple of {ALIGN} within the "
            f"{size}-byte region, past its first block",
        )
    return memory[t.offset : t.offset + nbytes].view(dtype).view(shape)


class RegionTable:
    """The regions mapped here, each bound to the connection that attached it.

    Keys are (peer, id), peer being `context.peer()` of the calls (one TCP connection): a
    SharedTensor resolves only among its own connection's regions. A reconnect is a new
    peer: its calls find nothing (FAILED_PRECONDITION) and the owner attaches again. Caps:
    PER_PEER_REGIONS per connection (the most recently used kept), MAX_REGIONS in all; another
    connection's region is evicted only after IDLE_EVICT_S unused (or once its owner closed
    it or exited), otherwise a newcomer is refused and uses bytes.
    """

    def __init__(
        self,
        per_peer: int = PER_PEER_REGIONS,
        capacity: int = MAX_REGIONS,
        idle_s: float = IDLE_EVICT_S,
    ) -> None:
        self.per_peer, self.capacity, self.idle_s = per_peer, capacity, idle_s
        # (peer, id) -> (region, last use); least recently used first.
        self._regions: OrderedDict[tuple[str, str], tuple[MappedRegion, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._regions)

    def attach(
        self, peer: str, request: pb.AttachRegionRequest, near: torch.device | None
    ) -> MappedRegion:
        """Map the region `request` offers for `peer`; SharedMemoryError if it cannot be
        mapped here or the table has no room that may be taken."""
        for key in [k for k, (r, _) in self._regions.items() if r.withdrawn()]:
            del self._regions[key]
        key = (peer, request.id)
        mine = [k for k in self._regions if k[0] == peer and k != key]
        evict_mine = mine[: max(0, len(mine) + 1 - self.per_peer)]
        evict_other: list[tuple[str, str]] = []
        taken = len(self._regions) - len(evict_mine) - (key in self._regions)
        if taken >= self.capacity:
            now = time.monotonic()
            idle = [  # least recently used first
                k
                for k, (_, used) in self._regions.items()
                if k[0] != peer and now - used >= self.idle_s
            ]
            evict_other = idle[: taken - self.capacity + 1]
            if len(evict_other) < taken - self.capacity + 1:
                raise SharedMemoryError(
                    f"this process holds {self.capacity} regions of other connections, each "
                    f"used within the last {self.idle_s:g} s: send bytes"
                )
        region = MappedRegion(request, near)  # checks and maps; evictions only once it did
        for k in [key, *evict_mine, *evict_other]:
            self._regions.pop(k, None)  # the mapping goes once no in-flight view holds it
        self._regions[key] = (region, time.monotonic())
        return region

    def view(
        self,
        peer: str,
        t: pb.SharedTensor,
        field: str,
        dtypes: frozenset[torch.dtype],
        rank: int,
    ) -> torch.Tensor:
        """As MappedRegion.view, in the region `t` names among `peer`'s."""
        key = (peer, t.region)
        entry = self._regions.get(key)
        if entry is None:
            raise RegionNotAttachedError(
                f"{field}.region: region {t.region[:MAX_ID_CHARS]!r} is not mapped for this "
                "connection; attach it (AttachRegion) on the connection that uses it"
            )
        self._regions[key] = (entry[0], time.monotonic())
        self._regions.move_to_end(key)
        return entry[0].view(t, field, dtypes, rank)
