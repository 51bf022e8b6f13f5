"""The CPU kernels' weight layouts: blocks of 16 output rows (`pack_bf16`, `pack_int8`, `pack_int4`,
`pack_groups` and their inverses, the layouts bf16_gemm.c, bf16w_gemm.c and int_gemv.c read), written at
load by pack.c where it is built (torch's strided copies elsewhere), in memory advised onto huge pages
(`empty_huge`) because decode streams it once a token. gemm.py calls the kernels on them.
"""

from __future__ import annotations

import math
import mmap

import torch

from qwen2vl.backends.cpu import native

ROWS = 16  # weight rows per block: one 32-bit lane of a 512-bit register each

HUGE_PAGE = 2 << 20


def empty_huge(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized tensor whose memory is advised to live on transparent huge pages (Linux,
    THP mode "madvise" or "always"); plain torch.empty elsewhere and for small sizes.

    Decode streams every weight once per token; on 4 KiB pages the CPU's prefetchers stop at each
    page edge and every page costs a TLB walk. Measured on this VM (2 threads, the 2B's decoder
    linears in layer order): 66 -> 74-76 GB/s when memory is fast, 45-49 -> 50 GB/s when slow.
    The advice only helps pages not yet touched, and malloc hands out reused (touched) heap
    memory for sizes up to 32 MiB, so the memory is a fresh anonymous mapping of its own, aligned
    to 2 MiB, which the tensor keeps alive (torch.frombuffer holds the mmap).
    """
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes < 2 * HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared: no THP
    offset = -torch.frombuffer(buf, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE
    # whole huge pages only: advising the partly used last one would make it resident in full (+2 MiB a
    # weight, measured +0.25 GB of peak RSS for the 2B); the bytes before `offset` are never touched
    try:
        buf.madvise(mmap.MADV_HUGEPAGE, offset, nbytes // HUGE_PAGE * HUGE_PAGE)
    except OSError:  # a kernel built without THP: EINVAL; the memory is still good
        pass
    return torch.frombuffer(buf, dtype=dtype, count=numel, offset=offset).view(shape)


def packed_copy(view: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `view` in memory advised onto huge pages (see empty_huge)."""
    return empty_huge(view.shape, view.dtype).copy_(view)


def pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """`t` with zero rows appended up to a multiple of `multiple` rows (`t` itself if it has them)."""
    return torch.cat([t, t.new_zeros(-t.shape[0] % multiple, *t.shape[1:])]) if t.shape[0] % multiple else t


def packed_bf16_shape(n: int, k: int) -> list[int]:
    """pack_bf16's output shape for an [n, k] weight."""
    return [-(-n // ROWS), k // 2, ROWS, 2]


def pack_bf16(w: torch.Tensor, huge_pages: bool = True) -> torch.Tensor:
    """bf16 [N, K] (K even) -> [ceil(N/16), K/2, 16, 2], zero rows padding N (see bf16_gemm.c); on
    huge pages unless told otherwise (see empty_huge)."""
    # a k pair as one int32 word: pack.c's transpose of 4-byte words
    out = pack_words(w.contiguous().view(torch.int32), huge_pages)
    return out.view(torch.bfloat16).view(packed_bf16_shape(*w.shape))


def pack_words(words: torch.Tensor, huge_pages: bool = True) -> torch.Tensor:
    """int32 [N, W] -> [ceil(N/16), W, 16], zero rows padding N: the kernels' blocks of 16 rows
    (pack.c, or torch's strided copy where it isn't built), on huge pages if asked (empty_huge)."""
    n, w = words.shape
    blocks = -(-n // ROWS)
    lib = native.library("pack")
    if lib is None or not words.is_contiguous():
        view = pad_rows(words, ROWS).reshape(blocks, ROWS, w).transpose(1, 2)
        return packed_copy(view) if huge_pages else view.contiguous()
    out = empty_huge((blocks, w, ROWS), torch.int32) if huge_pages else torch.empty(blocks, w, ROWS, dtype=torch.int32)
    lib.pack_rows16(words.data_ptr(), out.data_ptr(), n, w, torch.get_num_threads())
    return out


def unpack_bf16(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_bf16: [n, K]."""
    nb, k2 = packed.shape[:2]
    return packed.transpose(1, 2).reshape(nb * ROWS, k2 * 2)[:n]


# Layouts (see int_gemv.c): weights in blocks of 16 output rows, N padded to 16 by the caller.

def pack_int8(q: torch.Tensor, huge_pages: bool = True) -> torch.Tensor:
    """int8 [N, K] (N % 16 == 0) -> uint8 [N/16, K/4, 16, 4], code q + 128."""
    n, k = q.shape
    codes = (q.to(torch.int16) + 128).to(torch.uint8)
    return pack_words(codes.view(torch.int32), huge_pages).view(torch.uint8).view(n // ROWS, k // 4, ROWS, 4)


def quantize_int8(w: torch.Tensor, huge_pages: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
    """w [N, K] (bf16 or float32) quantized per row into pack_int8's layout in one C pass (pack.c):
    (codes uint8 [ceil(N/16), K/4, 16, 4], scales [N padded to 16] in w's dtype), the same bits as
    backends/quant.py's torch code; None where pack.c can't take `w` (that code is the fallback)."""
    lib = native.library("pack")
    n, k = w.shape
    if lib is None or w.device.type != "cpu" or w.dtype not in (torch.bfloat16, torch.float32) or k % 4:
        return None
    w = w.contiguous()
    blocks = -(-n // ROWS)
    codes = (empty_huge if huge_pages else torch.empty)((blocks, k // 4, ROWS, 4), dtype=torch.uint8)
    scales = torch.empty(blocks * ROWS, dtype=w.dtype)
    lib.quantize_int8(w.data_ptr(), w.dtype == torch.bfloat16, codes.data_ptr(), scales.data_ptr(), n, k,
                      torch.get_num_threads())
    return codes, scales


def unpack_int8(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int8: int8 [N, K]."""
    nb, k4 = packed.shape[:2]
    return (packed.transpose(1, 2).reshape(nb * ROWS, k4 * 4).to(torch.int16) - 128).to(torch.int8)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] in 0..15 (N % 16 == 0) -> uint8 [N/16, K/8, 16, 4]: for 8 consecutive k, the
    first 4 in the low nibbles and the last 4 in the high nibbles."""
    n, k = codes.shape
    c = codes.to(torch.uint8).view(n // ROWS, ROWS, k // 8, 2, 4).permute(0, 2, 1, 4, 3)  # [N/16, K/8, 16, 4, 2]
    return packed_copy(c[..., 0] | (c[..., 1] << 4))


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: codes [N, K] (uint8)."""
    nb, k8 = packed.shape[:2]
    c = torch.stack([packed & 15, packed >> 4], -1)  # [N/16, K/8, 16, 4, 2]
    return c.permute(0, 2, 1, 4, 3).reshape(nb * ROWS, k8 * 8)


def pack_groups(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """scales, zeros [N, K/group] (N % 16 == 0) -> [N/16, K/group, 2, 16]."""
    n, groups = scales.shape
    return torch.stack([scales, zeros]).view(2, n // ROWS, ROWS, groups).permute(1, 3, 0, 2).contiguous()


def unpack_groups(sz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of pack_groups: scales, zeros [N, K/group]."""
    nb, groups = sz.shape[:2]
    s = sz.permute(2, 0, 3, 1).reshape(2, nb * ROWS, groups)
    return s[0], s[1]
