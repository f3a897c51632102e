"""Shared memory between processes on one host: tensors skip the wire.

An owner (the master towards its workers, a client towards the master) creates a region:
POSIX shared memory for host tensors, device memory opened through CUDA IPC for GPU
tensors. The peer maps it once (AttachRegion); calls then carry offsets: the owner
writes the inputs in place, the peer writes the outputs back in place. A peer on another
host cannot map the region and is sent bytes, as is a call that finds the region full.

Only the owner allocates and frees, on one thread, so the allocator needs no lock; each
in-flight call owns its blocks until it ends, so calls never see each other's bytes.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import mmap
import os
import re
import secrets
import time
from collections import deque
from pathlib import Path

import grpc
import torch

from moe_serve.errors import InvalidRequestError, MoEError
from moe_serve.v1 import moe_pb2 as pb
from moe_serve.wire import dtype_name, itemsize, pb_dtype, torch_dtype

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
# A failed call's blocks stay reserved this long: its peer may still be writing its output
# there, and a reused block would hand those bytes to another call.
QUARANTINE_S = 60.0
# Tensors smaller than this travel as bytes even where a region is mapped: for them the
# bookkeeping and synchronisation of a block cost more than the copies they save.
MIN_SHARED_BYTES = 256 << 10
ALIGN = 256  # block offsets: any dtype's view lines up, and so do CUDA's vector loads
_NAME = re.compile(r"^moe_serve-(\d+)-[0-9a-f]{16}$")


class SharedMemoryError(MoEError):
    """A region cannot be created or mapped here; the reason says why."""


class RegionNotAttachedError(MoEError):
    """A Forward names a region this worker has not mapped (it restarted, say)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


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


def _sweep_stale_host_regions() -> None:
    """Remove regions left in /dev/shm by masters that died without closing them."""
    for path in SHM_DIR.glob("moe_serve-*"):
        m = _NAME.match(path.name)
        if m is None:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                log.info("removed %s, left by a master that is gone", path)
        except PermissionError:  # another user's live process
            pass


def _uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


class SharedRegion:
    """An owner's region on `device`: `size` bytes, an allocator, typed views."""

    def __init__(self, size: int, device: torch.device) -> None:
        if size <= ALIGN:
            raise SharedMemoryError(f"a region needs more than {ALIGN} bytes, got {size}")
        self.id, self.size, self.device = secrets.token_hex(8), size, device
        self.nonce = secrets.token_bytes(16)
        self._path: Path | None = None
        if device.type == "cuda":
            self.memory = torch.empty(size, dtype=torch.uint8, device=device)
            self._describe = self._cuda_description()
        else:
            self.memory = self._host_memory(size)
            self._describe = pb.AttachRegionRequest(host=pb.HostRegion(name=self._path.name))
        # The nonce goes in the first (never allocated) block; see AttachRegionRequest.nonce.
        self.memory[: len(self.nonce)].copy_(
            torch.frombuffer(bytearray(self.nonce), dtype=torch.uint8)
        )
        self._describe.id, self._describe.size, self._describe.nonce = self.id, size, self.nonce
        self._blocks = _Blocks(size)
        self._quarantine: deque[tuple[float, tuple[int, ...], tuple[int, ...]]] = deque()

    def _host_memory(self, size: int) -> torch.Tensor:
        if not SHM_DIR.is_dir():
            raise SharedMemoryError(f"{SHM_DIR} does not exist on this host")
        _sweep_stale_host_regions()
        self._path = SHM_DIR / f"moe_serve-{os.getpid()}-{self.id}"
        fd = os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            # Reserve every page now: a full /dev/shm fails here with ENOSPC, instead of
            # killing a process with SIGBUS on first touch later.
            os.posix_fallocate(fd, 0, size)
            mapping = mmap.mmap(fd, size)
        except OSError as exc:
            self._path.unlink()
            raise SharedMemoryError(f"cannot reserve {size} bytes in {SHM_DIR}: {exc}") from None
        finally:
            os.close(fd)
        return torch.frombuffer(mapping, dtype=torch.uint8)

    def _cuda_description(self) -> pb.AttachRegionRequest:
        (_, handle, size, offset, ref_handle, ref_offset, event, event_sync) = (
            self.memory.untyped_storage()._share_cuda_()
        )
        return pb.AttachRegionRequest(
            cuda=pb.CudaRegion(
                device_uuid=_uuid(self.device.index or 0),
                handle=handle,
                storage_size=size,
                storage_offset=offset,
                ref_counter_handle=ref_handle,
                ref_counter_offset=ref_offset,
                event_handle=event or b"",
                event_sync_required=event_sync,
            )
        )

    def description(self) -> pb.AttachRegionRequest:
        """What a worker needs to map this region."""
        return self._describe

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
            _, offsets, held = self._quarantine.popleft()
            for offset, nbytes in zip(offsets, held, strict=True):
                self.free(offset, nbytes)
        offsets = []
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
        """Unlink the host object (mapped workers keep their mapping until they drop it)."""
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()
            self._path = None


class MappedRegion:
    """A peer's mapping of an owner's region."""

    def __init__(self, request: pb.AttachRegionRequest, near: torch.device | None) -> None:
        """Map the offered region. `near`: the CUDA device this process computes on, where
        CUDA memory is best mapped; None refuses CUDA regions."""
        self.id, self.size = request.id, request.size
        kind = request.WhichOneof("memory")
        if kind == "host":
            self.memory = self._map_host(request.host.name, request.size)
        elif kind == "cuda":
            if near is None:
                raise SharedMemoryError("this process computes on no CUDA device")
            self.memory = self._map_cuda(request.cuda, request.size, near)
        else:
            raise SharedMemoryError("memory: neither host nor cuda is set")
        if (
            request.nonce
            and bytes(self.memory[: len(request.nonce)].cpu().tolist()) != request.nonce
        ):
            raise SharedMemoryError("the mapped memory does not hold the owner's nonce")

    @staticmethod
    def _map_host(name: str, size: int) -> torch.Tensor:
        if not _NAME.match(name):
            raise SharedMemoryError(f"host.name: {name!r} is not a moe_serve region name")
        try:
            fd = os.open(SHM_DIR / name, os.O_RDWR)
        except OSError as exc:
            raise SharedMemoryError(f"cannot open {name} here (another host?): {exc}") from None
        try:
            if os.fstat(fd).st_size < size:
                raise SharedMemoryError(f"{name} is smaller than {size} bytes")
            return torch.frombuffer(mmap.mmap(fd, size), dtype=torch.uint8)
        finally:
            os.close(fd)

    @staticmethod
    def _map_cuda(c: pb.CudaRegion, size: int, near: torch.device) -> torch.Tensor:
        if not torch.cuda.is_available():
            raise SharedMemoryError("CUDA is not available in this process")
        owner = next(
            (i for i in range(torch.cuda.device_count()) if _uuid(i) == c.device_uuid), None
        )
        if owner is None:
            raise SharedMemoryError(f"no GPU here has UUID {c.device_uuid} (another host?)")
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
                storage = torch.UntypedStorage._new_shared_cuda(
                    index,
                    c.handle,
                    c.storage_size,
                    c.storage_offset,
                    c.ref_counter_handle,
                    c.ref_counter_offset,
                    c.event_handle or None,
                    c.event_sync_required,
                )
                break
            except RuntimeError as exc:
                if i == len(tries) - 1:
                    raise SharedMemoryError(f"CUDA IPC open failed: {exc}") from None
                log.info(
                    "CUDA IPC open on cuda:%d failed (%s); mapping on cuda:%d", index, exc, owner
                )
        memory = torch.empty(0, dtype=torch.uint8, device=f"cuda:{index}").set_(storage)
        if memory.numel() < size:
            raise SharedMemoryError(f"the CUDA allocation is smaller than {size} bytes")
        return memory[:size]

    def view(
        self, t: pb.SharedTensor, field: str, dtypes: frozenset[torch.dtype], rank: int
    ) -> torch.Tensor:
        """The tensor `t` names, checked against this region; errors name `field`."""
        if t.region != self.id:
            raise RegionNotAttachedError(f"{field}.region: {t.region!r} is not mapped here")
        return _checked_view(self.memory, self.size, t, field, dtypes, rank)


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
    shape = tuple(t.shape)
    if len(shape) != rank or any(d < 0 for d in shape):
        raise InvalidRequestError(f"{field}.shape", f"{list(shape)}; expected rank {rank}")
    nbytes = itemsize(dtype) * math.prod(shape)
    if t.offset % ALIGN or t.offset + nbytes > size:
        raise InvalidRequestError(
            f"{field}.offset",
            f"{t.offset} (+{nbytes} bytes) must be a multiple of {ALIGN} within the "
            f"{size}-byte region",
        )
    return memory[t.offset : t.offset + nbytes].view(dtype).view(shape)


class RegionTable:
    """The regions the master has mapped, one per client on its host, newest `capacity`
    kept (mapping an older one again is one AttachRegion call for its client)."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._regions: dict[str, MappedRegion] = {}

    def attach(self, request: pb.AttachRegionRequest, near: torch.device | None) -> MappedRegion:
        """Map the region `request` offers; SharedMemoryError if it cannot be mapped here."""
        region = MappedRegion(request, near)
        self._regions.pop(region.id, None)
        self._regions[region.id] = region
        while len(self._regions) > self.capacity:
            del self._regions[next(iter(self._regions))]  # dicts keep insertion order
        return region

    def view(
        self, t: pb.SharedTensor, field: str, dtypes: frozenset[torch.dtype], rank: int
    ) -> torch.Tensor:
        """As MappedRegion.view, in whichever mapped region `t` names."""
        region = self._regions.get(t.region)
        if region is None:
            raise RegionNotAttachedError(f"{field}.region: {t.region!r} is not mapped here")
        return region.view(t, field, dtypes, rank)
