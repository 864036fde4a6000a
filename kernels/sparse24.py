"""2:4 tooling at model scale: magnitude 2:4 masks and the permutation search's split scores, as Triton kernels.

Two kernels, each with a plain torch reference beside it (the definition the tests compare with, and the path on
CPU tensors):

- :func:`mask_2of4`: the keep-mask of :func:`trt_prune.sparsity.pattern.mask_2of4` (the 2 largest ``|w|`` of
  every 4 consecutive values along TensorRT's reduction axis; ties keep the lower index; a NaN ranks below every
  number, as in numpy's sort). The axis is moved last and made contiguous, so the runs of 4 are consecutive in
  memory; one program handles a block of runs.
- :func:`split_scores`: what the numpy search's ``_SplitScorer`` computes: for each pair of stripes (two runs of
  4 input channels, 8 columns) and each of the 35 ways to split its 8 columns into two stripes, the magnitude the
  2:4 mask keeps, summed over the rows. One program handles one stripe pair and one chunk of rows: it gathers the
  4 member columns of all 70 stripes of the 35 splits and accumulates the top-2 sums in fp32.
  :class:`TorchSplitScorer` wraps it in the scorer contract of ``search_permutation(..., scorer="kernel")``.

Precision of the split scores: the top-2 sum of one stripe in one row is computed with the same fp32 operations as
the numpy scorer (``max(a+b, c+d, max(a,b) + max(c,d))``), so it is bit-identical; only the order of the sum over
rows differs. Each program accumulates at most ``rows_per_program`` rows in fp32 (per lane, then a tree over the
lanes), the chunks are added in fp64 - the structure of the numpy scorer (fp32 per block of rows, fp64 across
blocks). The scores agree with the numpy scorer, and with an fp64 sum of the same terms, to a relative 1e-6 on
random matrices (the tests check 1e-5).

``impl``: ``"auto"`` runs the Triton kernel on CUDA tensors and the torch reference on CPU tensors; ``"triton"``
forces the kernel (on CPU tensors only under Triton's interpreter, ``TRITON_INTERPRET=1``); ``"torch"`` forces the
reference. Triton reads ``TRITON_INTERPRET`` when it decorates a kernel, so the kernels are made at first use (one
set per interpreter setting), not at import: a test can set the variable after importing this module.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from types import SimpleNamespace

import numpy as np
import torch

from trt_prune.errors import KernelError

__all__ = ["IMPLS", "TorchSplitScorer", "interpreting", "mask_2of4", "mask_2of4_reference", "split_scores",
           "split_scores_reference"]

GROUP = 4
KEEP = 2
IMPLS = ("auto", "triton", "torch")

# The 35 splits of 8 columns into two stripes of 4 (the 4-subsets holding column 0; split 0 keeps the stripes as
# they are), in the order of the numpy scorer: split j is stripes 2j (its first 4 positions) and 2j+1 (the rest).
_SPLITS = [s for s in itertools.combinations(range(2 * GROUP), GROUP) if s[0] == 0]
_SPLIT_COLUMNS = np.array([list(s) + [c for c in range(2 * GROUP) if c not in s] for s in _SPLITS])  # [35, 8]
_STRIPES = _SPLIT_COLUMNS.reshape(-1, GROUP)  # [70, 4] positions 0..7 in a pair's 8 columns
# the torch reference, like the numpy scorer, works on the 28 column pairs: a stripe is two of them
_PAIRS = list(itertools.combinations(range(2 * GROUP), 2))
_PAIR_INDEX = {p: i for i, p in enumerate(_PAIRS)}
_PAIR_COLUMNS = np.array(_PAIRS).T  # [2, 28]
_HALVES = np.array([[_PAIR_INDEX[(s[0], s[1])] for s in _STRIPES], [_PAIR_INDEX[(s[2], s[3])] for s in _STRIPES]])
N_SPLITS = len(_SPLITS)  # 35
N_STRIPES = len(_STRIPES)  # 70

# launch shapes; the interpreter runs every program as numpy calls in Python, so it gets fewer, larger programs
_MASK_BLOCK = 256  # runs of 4 per program
_MASK_BLOCK_INTERPRET = 4096
_SPLIT_BLOCK_S = 128  # the 70 stripes, padded to a power of 2
_SPLIT_BLOCK_R = 16  # rows per step of a program
_SPLIT_BLOCK_R_INTERPRET = 64
_ROWS_PER_PROGRAM = 512  # rows per program (a multiple of both row blocks): fp32 accumulation length
_MAX_CHUNKS = 65_535  # CUDA's limit on grid axis 1
_REFERENCE_ELEMENTS = 1 << 24  # per [pairs, 70, rows] temporary of the torch reference


# --------------------------------------------------------------------------------------------------------------
# choosing the implementation
# --------------------------------------------------------------------------------------------------------------


def interpreting() -> bool:
    """True when Triton's interpreter is switched on (``TRITON_INTERPRET=1``) and Triton is importable."""
    try:
        import triton
    except ImportError:
        return False
    return bool(triton.knobs.runtime.interpret)


def _triton_missing() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"Triton cannot be imported ({e})"
    return None


def _resolve(impl: str, device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` for ``impl`` on tensors of ``device``; a KernelError when it cannot run."""
    if impl not in IMPLS:
        raise KernelError(f"impl {impl!r} is not one of {', '.join(IMPLS)}")
    if impl == "torch":
        return "torch"
    if impl == "auto":
        return "triton" if device.type == "cuda" and _triton_missing() is None else "torch"
    missing = _triton_missing()
    if missing:
        raise KernelError(f"impl='triton' needs Triton: {missing}; install the torch build that ships it, or use "
                          "impl='torch' (or 'auto')")
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        if not interpreting():
            raise KernelError("impl='triton' was asked for on CPU tensors, but Triton's interpreter is off "
                              "(TRITON_INTERPRET is not set): set TRITON_INTERPRET=1 to run the kernel on the CPU, "
                              "pass CUDA tensors, or use impl='torch' (or 'auto')")
        return "triton"
    raise KernelError(f"impl='triton' runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), not on "
                      f"device {device}; move the tensors or use impl='torch'")


@functools.lru_cache(maxsize=2)
def _kernels(interpret: bool) -> SimpleNamespace:
    """The jitted kernels, made on first use for the interpreter setting of that moment (``triton.jit`` reads it)."""
    import triton
    import triton.language as tl

    # Builtins only: triton.language's own jitted helpers (tl.sum, tl.zeros) were jitted when triton was first
    # imported, so in a process that imported triton before TRITON_INTERPRET was set they are compiled-mode
    # functions the interpreter refuses to call. tl.full and tl.reduce are builtins; tl.reduce with
    # triton.language's own sum combiner is what tl.sum compiles to, and the interpreter runs it as one np.sum.
    # (The interpreter re-executes a kernel's source against this module's globals, so a combiner jitted here as
    # a closure would not be found.)
    @triton.jit
    def mask_kernel(w_ptr, out_ptr, n_runs, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        runs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        live = runs < n_runs
        base = runs * 4
        a0 = tl.abs(tl.load(w_ptr + base, mask=live, other=0.0))
        a1 = tl.abs(tl.load(w_ptr + base + 1, mask=live, other=0.0))
        a2 = tl.abs(tl.load(w_ptr + base + 2, mask=live, other=0.0))
        a3 = tl.abs(tl.load(w_ptr + base + 3, mask=live, other=0.0))
        # a NaN sorts after every number in numpy's argsort: rank it below every magnitude
        a0 = tl.where(a0 == a0, a0, -1.0)
        a1 = tl.where(a1 == a1, a1, -1.0)
        a2 = tl.where(a2 == a2, a2, -1.0)
        a3 = tl.where(a3 == a3, a3, -1.0)
        # position of each value in a stable descending sort: the values greater than it, and the equal ones
        # before it (ties keep the lower index); the first 2 positions are kept
        r0 = (a1 > a0).to(tl.int32) + (a2 > a0).to(tl.int32) + (a3 > a0).to(tl.int32)
        r1 = (a0 >= a1).to(tl.int32) + (a2 > a1).to(tl.int32) + (a3 > a1).to(tl.int32)
        r2 = (a0 >= a2).to(tl.int32) + (a1 >= a2).to(tl.int32) + (a3 > a2).to(tl.int32)
        r3 = (a0 >= a3).to(tl.int32) + (a1 >= a3).to(tl.int32) + (a2 >= a3).to(tl.int32)
        tl.store(out_ptr + base, (r0 < 2).to(tl.uint8), mask=live)
        tl.store(out_ptr + base + 1, (r1 < 2).to(tl.uint8), mask=live)
        tl.store(out_ptr + base + 2, (r2 < 2).to(tl.uint8), mask=live)
        tl.store(out_ptr + base + 3, (r3 < 2).to(tl.uint8), mask=live)

    @triton.jit
    def split_kernel(columns_ptr, cols8_ptr, stripes_ptr, partial_ptr, rows, rows_per_program, n_chunks,
                     N_STRIPES: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr):
        pair = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1).to(tl.int64)
        s = tl.arange(0, BLOCK_S)
        live_s = s < N_STRIPES
        # the 4 member columns of every stripe of the 35 splits of this pair: their offsets in columns [C, rows]
        p0 = tl.load(stripes_ptr + s * 4, mask=live_s, other=0)
        p1 = tl.load(stripes_ptr + s * 4 + 1, mask=live_s, other=0)
        p2 = tl.load(stripes_ptr + s * 4 + 2, mask=live_s, other=0)
        p3 = tl.load(stripes_ptr + s * 4 + 3, mask=live_s, other=0)
        o0 = tl.load(cols8_ptr + pair * 8 + p0, mask=live_s, other=0).to(tl.int64) * rows
        o1 = tl.load(cols8_ptr + pair * 8 + p1, mask=live_s, other=0).to(tl.int64) * rows
        o2 = tl.load(cols8_ptr + pair * 8 + p2, mask=live_s, other=0).to(tl.int64) * rows
        o3 = tl.load(cols8_ptr + pair * 8 + p3, mask=live_s, other=0).to(tl.int64) * rows
        start = chunk * rows_per_program
        stop = tl.minimum(start + rows_per_program, rows)
        acc = tl.full([BLOCK_S, BLOCK_R], 0.0, tl.float32)
        for r0 in range(start, stop, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
            live = live_s[:, None] & (r < stop)[None, :]
            x0 = tl.load(columns_ptr + o0[:, None] + r[None, :], mask=live, other=0.0)
            x1 = tl.load(columns_ptr + o1[:, None] + r[None, :], mask=live, other=0.0)
            x2 = tl.load(columns_ptr + o2[:, None] + r[None, :], mask=live, other=0.0)
            x3 = tl.load(columns_ptr + o3[:, None] + r[None, :], mask=live, other=0.0)
            # top-2 sum of {x0, x1, x2, x3}: one of the pairs, or the larger of each pair (the numpy scorer's ops)
            top2 = tl.maximum(tl.maximum(x0 + x1, x2 + x3), tl.maximum(x0, x1) + tl.maximum(x2, x3))
            acc += top2
        total = tl.reduce(acc, 1, tl.standard._sum_combine)
        tl.store(partial_ptr + (pair * n_chunks + chunk) * N_STRIPES + s, total, mask=live_s)

    return SimpleNamespace(mask=mask_kernel, split=split_kernel)


def _launching_on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------------------
# 2:4 masks
# --------------------------------------------------------------------------------------------------------------


def _check_weight(weight, axis) -> int:
    if not isinstance(weight, torch.Tensor):
        raise KernelError(f"mask_2of4 takes a torch.Tensor, got {type(weight).__name__}; for numpy arrays use "
                          "trt_prune.sparsity.pattern.mask_2of4")
    if not weight.is_floating_point():
        raise KernelError(f"mask_2of4 needs a floating-point weight, got dtype {weight.dtype}; convert it with "
                          ".float()")
    if weight.dim() < 2:
        raise KernelError(f"mask_2of4 needs a weight with at least 2 dimensions, got shape {tuple(weight.shape)}")
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool) or not -weight.dim() <= axis < weight.dim():
        raise KernelError(f"axis {axis!r} is not an axis of shape {tuple(weight.shape)}: pass an int in "
                          f"[{-weight.dim()}, {weight.dim() - 1}] (1 for Conv/Linear weights, 0 for an ONNX MatMul B)")
    axis = int(axis) % weight.dim()
    length = weight.shape[axis]
    if length == 0 or length % GROUP:
        raise KernelError(f"axis {axis} of shape {tuple(weight.shape)} has length {length}, not a positive multiple "
                          f"of {GROUP}: the 2:4 pattern needs runs of {GROUP} along it; pick another axis or pad "
                          "the channels")
    return axis


def _ranked(groups: torch.Tensor) -> torch.Tensor:
    """Keep-mask of ``groups [..., 4]``: rank in a stable descending sort of ``|x|`` (NaN last) below 2."""
    a = groups.abs()
    a = torch.where(torch.isnan(a), torch.full_like(a, -1.0), a)
    other, this = a.unsqueeze(-2), a.unsqueeze(-1)  # [..., 1, 4] (k) against [..., 4, 1] (j)
    index = torch.arange(GROUP, device=a.device)
    before = (other > this) | ((other == this) & (index[None, :] < index[:, None]))
    return before.sum(-1) < KEEP


def mask_2of4_reference(weight: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """Torch reference of :func:`mask_2of4`: equal to ``trt_prune.sparsity.pattern.mask_2of4`` on any tensor."""
    axis = _check_weight(weight, axis)
    moved = weight.detach().movedim(axis, -1)
    keep = _ranked(moved.reshape(*moved.shape[:-1], moved.shape[-1] // GROUP, GROUP))
    return keep.reshape(moved.shape).movedim(-1, axis).contiguous()


def mask_2of4(weight: torch.Tensor, axis: int = 1, impl: str = "auto") -> torch.Tensor:
    """Boolean keep-mask of ``weight``'s shape and device: the 2 largest ``|w|`` of every 4 consecutive values
    along ``axis`` (1 for Conv ``[K, C, R, S]`` and Linear ``[out, in]`` weights, TensorRT's reduction axis).

    Ties keep the lower index, NaN ranks below every number: the same mask as
    :func:`trt_prune.sparsity.pattern.mask_2of4`. ``impl``: ``"auto"`` (Triton on CUDA, torch on CPU),
    ``"triton"`` or ``"torch"``. Raises :class:`~trt_prune.errors.KernelError` on a bad weight or axis.
    """
    axis = _check_weight(weight, axis)
    if _resolve(impl, weight.device) == "torch":
        return mask_2of4_reference(weight, axis)
    interpret = interpreting()
    moved = weight.detach().movedim(axis, -1).contiguous()
    if interpret and moved.dtype == torch.bfloat16:
        moved = moved.float()  # the interpreter has no bf16 constants; the upcast keeps order and ties exactly
    out = torch.empty(moved.shape, dtype=torch.uint8, device=moved.device)
    n_runs = moved.numel() // GROUP
    if n_runs:
        block = _MASK_BLOCK_INTERPRET if interpret else _MASK_BLOCK
        with _launching_on(moved.device):
            _kernels(interpret).mask[(-(-n_runs // block),)](moved, out, n_runs, BLOCK=block)
    return out.view(torch.bool).movedim(-1, axis).contiguous()


# --------------------------------------------------------------------------------------------------------------
# split scores of the permutation search
# --------------------------------------------------------------------------------------------------------------


def _check_columns(columns) -> None:
    if not isinstance(columns, torch.Tensor) or columns.dim() != 2 or columns.dtype != torch.float32:
        what = (f"a {type(columns).__name__}" if not isinstance(columns, torch.Tensor)
                else f"shape {tuple(columns.shape)}, dtype {columns.dtype}")
        raise KernelError(f"columns must be a 2-D float32 tensor [channels, rows] of magnitudes, got {what}; build "
                          "it as torch.as_tensor(magnitude_rows(weight).T, dtype=torch.float32)")
    if columns.shape[0] < 2 * GROUP:
        raise KernelError(f"columns has {columns.shape[0]} channels (shape {tuple(columns.shape)}); a stripe pair "
                          f"needs at least {2 * GROUP}")


def _check_cols8(cols8, channels: int) -> None:
    """Shape, dtype and range of the column ids (a tensor or an ndarray)."""
    shape = tuple(cols8.shape)
    if len(shape) != 2 or shape[1] != 2 * GROUP:
        raise KernelError(f"cols8 must be [pairs, {2 * GROUP}] column ids (the two stripes of each pair), got shape "
                          f"{shape}")
    integer = (not cols8.is_floating_point() and not cols8.is_complex() and cols8.dtype != torch.bool
               if isinstance(cols8, torch.Tensor) else np.issubdtype(cols8.dtype, np.integer))
    if not integer:
        raise KernelError(f"cols8 must hold integer column ids, got dtype {cols8.dtype}")
    if shape[0]:
        low, high = int(cols8.min()), int(cols8.max())
        if low < 0 or high >= channels:
            bad = low if low < 0 else high
            raise KernelError(f"cols8 holds column id {bad}, outside [0, {channels - 1}] for {channels} channels; "
                              "pass ids of columns (input channels) of this matrix")


def _pair_sums(total: torch.Tensor) -> torch.Tensor:
    """``[pairs, 70]`` stripe sums -> ``[pairs, 35]`` split sums (float64)."""
    total = total.to(torch.float64)
    return total[:, 0::2] + total[:, 1::2]


def _split_reference(columns: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    n, rows = ids.shape[0], columns.shape[1]
    first, second = (torch.as_tensor(i, device=columns.device) for i in _PAIR_COLUMNS)
    half_a, half_b = (torch.as_tensor(i, device=columns.device) for i in _HALVES)
    total = torch.zeros((n, N_STRIPES), dtype=torch.float64, device=columns.device)
    block = max(1, min(rows, _REFERENCE_ELEMENTS // max(1, n * N_STRIPES)))
    for r in range(0, rows, block):
        x = columns[:, r:r + block][ids]  # [n, 8, block]
        a, b = x[:, first], x[:, second]  # the 28 column pairs
        sums, maxes = a + b, torch.maximum(a, b)
        # top-2 sum of a stripe {a,b,c,d} = max(a+b, c+d, max(a,b) + max(c,d)), the numpy scorer's fp32 ops
        top2 = torch.maximum(torch.maximum(sums[:, half_a], sums[:, half_b]), maxes[:, half_a] + maxes[:, half_b])
        total += top2.sum(-1, dtype=torch.float64)
    return _pair_sums(total)


def _split_triton(columns: torch.Tensor, ids: torch.Tensor, stripes: torch.Tensor,
                  partial: torch.Tensor | None = None, rows_per_program: int = _ROWS_PER_PROGRAM) -> torch.Tensor:
    """Launch the split kernel; ``ids`` int32 [n, 8] and ``stripes`` int32 [70, 4] on ``columns``' device."""
    interpret = interpreting()
    n, rows = ids.shape[0], columns.shape[1]
    if n == 0 or rows == 0:
        return torch.zeros((n, N_SPLITS), dtype=torch.float64, device=columns.device)
    block_r = _SPLIT_BLOCK_R_INTERPRET if interpret else _SPLIT_BLOCK_R
    per = max(rows_per_program, -(-rows // _MAX_CHUNKS))
    per = -(-per // block_r) * block_r
    chunks = -(-rows // per)
    if partial is None or partial.numel() < n * chunks * N_STRIPES:
        partial = torch.empty(n * chunks * N_STRIPES, dtype=torch.float32, device=columns.device)
    out = partial[:n * chunks * N_STRIPES]
    with _launching_on(columns.device):
        _kernels(interpret).split[(n, chunks)](columns, ids, stripes, out, rows, per, chunks, N_STRIPES=N_STRIPES,
                                               BLOCK_S=_SPLIT_BLOCK_S, BLOCK_R=block_r)
    out = out.view(n, chunks, N_STRIPES)
    return _pair_sums(out[:, 0] if chunks == 1 else out.to(torch.float64).sum(1))


def split_scores_reference(columns: torch.Tensor, cols8: torch.Tensor) -> torch.Tensor:
    """Torch reference of :func:`split_scores` (per-row top-2 sums in fp32, summed over rows in fp64)."""
    _check_columns(columns)
    _check_cols8(cols8, columns.shape[0])
    return _split_reference(columns.contiguous(), cols8.to(device=columns.device, dtype=torch.int64))


def split_scores(columns: torch.Tensor, cols8: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Kept magnitude of every split of every stripe pair: ``[pairs, 35]`` float64 on ``columns``' device.

    ``columns``: ``[C, rows]`` float32 magnitudes, one row per input channel (``magnitude_rows(weight).T``).
    ``cols8``: ``[pairs, 8]`` integer column ids, the two stripes of each pair. Entry ``[p, j]`` is the sum over
    rows of the top-2 of each of the two stripes of split ``j`` (split 0: the stripes as given), in the split order
    of ``trt_prune.sparsity.permutation``; what its numpy ``_SplitScorer`` returns, to a relative 1e-5 (see the
    module docstring on precision). ``impl``: ``"auto"``, ``"triton"`` or ``"torch"``.
    """
    _check_columns(columns)
    _check_cols8(cols8, columns.shape[0])
    ids = cols8.to(device=columns.device)
    if _resolve(impl, columns.device) == "torch":
        return _split_reference(columns.contiguous(), ids.to(torch.int64))
    stripes = torch.as_tensor(_STRIPES, dtype=torch.int32, device=columns.device)
    return _split_triton(columns.contiguous(), ids.to(torch.int32).contiguous(), stripes)


class TorchSplitScorer:
    """The permutation search's scorer on torch: ``__call__(cols8 [pairs, 8] ndarray) -> [pairs, 35]`` float64
    ndarray, the contract of ``trt_prune.sparsity.permutation._SplitScorer``.

    ``columns``: ``[C, rows]`` float32 magnitudes (ndarray or tensor), copied to ``device`` once (default: CUDA
    when available, else the CPU). ``impl``: None picks the Triton kernel on CUDA and under Triton's interpreter
    (``TRITON_INTERPRET=1``), the torch reference otherwise; or one of ``"auto"``, ``"triton"``, ``"torch"``.
    ``path`` says which ran (``"triton:cuda"``, ``"triton-interpreter:cpu"``, ``"torch:cpu"``, ...).
    """

    def __init__(self, columns, max_pairs: int, device=None, impl: str | None = None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise KernelError(f"device {device!r} is not a torch device ({e}); pass 'cuda', 'cuda:1' or 'cpu'") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise KernelError(f"device {device} was asked for, but torch sees no CUDA GPU; pass device='cpu' "
                              "(or None to pick)")
        columns = torch.as_tensor(columns)
        _check_columns(columns)
        if impl is None:
            impl = "triton" if device.type == "cuda" or (device.type == "cpu" and interpreting()) else "torch"
        self.impl = _resolve(impl, device)
        self.device = device
        self.max_pairs = int(max_pairs)
        self.columns = columns.to(device).contiguous()
        self.stripes = torch.as_tensor(_STRIPES, dtype=torch.int32, device=device)
        self.partial: torch.Tensor | None = None
        interpret = self.impl == "triton" and device.type == "cpu"
        self.path = f"{'triton-interpreter' if interpret else self.impl}:{device.type}"

    def __call__(self, cols8: np.ndarray) -> np.ndarray:
        cols8 = np.asarray(cols8)
        _check_cols8(cols8, self.columns.shape[0])
        if cols8.shape[0] > self.max_pairs:
            raise KernelError(f"{cols8.shape[0]} stripe pairs scored at once, more than max_pairs={self.max_pairs} "
                              "this scorer was made for; make it with a larger max_pairs")
        ids = torch.from_numpy(np.ascontiguousarray(cols8, dtype=np.int32)).to(self.device)
        if self.impl == "torch":
            values = _split_reference(self.columns, ids.to(torch.int64))
        else:
            if self.partial is None:  # sized for max_pairs on the first call, reused after
                chunks = -(-self.columns.shape[1] // _ROWS_PER_PROGRAM)
                self.partial = torch.empty(max(1, self.max_pairs) * chunks * N_STRIPES, dtype=torch.float32,
                                           device=self.device)
            values = _split_triton(self.columns, ids, self.stripes, self.partial)
        return values.cpu().numpy()
