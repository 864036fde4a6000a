"""Input-channel permutation search for 2:4 sparsity: pure numpy, no torch needed.

The 2:4 mask keeps the 2 largest |w| of every run of 4 consecutive input channels (columns of a Linear weight
``[out, in]``; axis 1 of a conv weight ``[K, C, R, S]``). Reordering the input channels changes which channels
share a run, and so how much magnitude survives. The network computes the same function when the consumer's
input channels and the producer's output channels (its weight rows and bias) are reordered with the same
permutation; this is the channel-permutation idea of Pool & Yu, "Channel Permutations for N:M Sparsity"
(NeurIPS 2021), which NVIDIA's ASP implements. The search here is our own.

A weight is scored as a 2-D matrix of magnitudes ``[rows, C]``: axis 1 moved last and the rest flattened, so a
conv ``[K, C, R, S]`` gives ``K*R*S`` rows, each with its own runs of 4 along ``C``. Only the partition of the
columns into *stripes* (runs of 4) matters; the order of stripes and of columns inside one does not.

Search (:func:`search_permutation`), all of it on "stripe pairs": two runs of 4 hold 8 columns, which split into
two runs of 4 in 35 ways, all scored at once (vectorised over pairs and rows):

1. start from the better of the identity and a sort-based assignment (:func:`sorted_permutation`);
2. greedy descent: round-robin schedules of disjoint stripe pairs, each pair moved to its best split, until
   every pair has been checked without an improvement (a local optimum of this 8-column neighbourhood); it
   stops here when it reaches the unstructured bound or when the budget is too short for step 3;
3. simulated annealing: each round draws a random perfect matching of the stripes and samples one split per
   pair from the Boltzmann distribution over its 35 scores (Gumbel-max trick), at a temperature cooled
   geometrically from 0.3 to 0.02 times the spread of the split scores; the best state seen is kept;
4. greedy descent again, from that best state.

The number of annealing rounds comes from a fixed work model (seconds per round as a function of the shape, see
:func:`planned_rounds`), not from a clock, so the search is deterministic for a given ``seed``, ``time_budget_s``
and shape whenever it finishes inside the budget. The clock only stops it early: when the machine is slower
than the model, or when the greedy descent of a large layer does not converge in time (such layers skip the
annealing and spend the budget on the descent); the result then depends on where it stopped. ``rounds=``
fixes the schedule length explicitly. The result is never worse than the identity.

On a shared 2-core AMD EPYC, 1 s per weight: efficacy about 53 (min about 50) on standard-normal 64x128
matrices, about 37 on the uniform 128x64 matrix of ASP's ChannelPermutations README (ASP: 36.6 in 0.86 s on a
V100 with 12-column stripe groups); see ``bench/permutation_search.py``.

The split scores are the whole cost of a round. ``scorer="kernel"`` computes them with the Triton kernel of
``trt_prune.kernels.sparse24`` (:class:`~trt_prune.kernels.sparse24.TorchSplitScorer`) on a CUDA GPU, which
affords layers of 2,048 channels; on the CPU that scorer runs the kernel under Triton's interpreter
(``TRITON_INTERPRET=1``) or its torch reference. The default ``"numpy"`` needs no torch. The kernel's scores
equal numpy's to about 1e-7 relative (different summation order), so a search with the same seed and ``rounds``
makes the same moves except where two splits score within rounding of each other.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .pattern import GROUP, KEEP

# --------------------------------------------------------------------------------------------------------------
# kept magnitudes and efficacy
# --------------------------------------------------------------------------------------------------------------


def magnitude_rows(weight) -> np.ndarray:
    """``|weight|`` as a 2-D float64 ``[rows, C]`` matrix, C the input-channel axis (axis 1 of the weight).

    A Linear weight ``[out, in]`` is itself; a conv weight ``[K, C, R, S]`` becomes ``[K*R*S, C]``. Takes numpy
    arrays and torch tensors (detached and copied to the CPU).
    """
    if hasattr(weight, "detach"):
        weight = weight.detach().cpu().numpy()
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim < 2:
        raise ValueError(f"need a weight with at least 2 dimensions, got shape {w.shape}")
    channels = w.shape[1]
    if channels == 0 or channels % GROUP:
        raise ValueError(f"input channels (axis 1) {channels} of shape {w.shape} is not a positive multiple of "
                         f"{GROUP}")
    return np.abs(np.moveaxis(w, 1, -1).reshape(-1, channels))


def _check_perm(perm, channels: int) -> np.ndarray:
    perm = np.asarray(perm)
    if perm.shape != (channels,) or not np.array_equal(np.sort(perm), np.arange(channels)):
        raise ValueError(f"not a permutation of {channels} channels")
    return perm.astype(np.intp)


def _kept_rows(rows: np.ndarray) -> float:
    """Magnitude kept by the 2:4 mask on the columns of ``rows`` as they stand."""
    runs = np.sort(rows.reshape(rows.shape[0], -1, GROUP), axis=-1)
    return float(runs[..., GROUP - KEEP:].sum())


def kept_plain(weight) -> float:
    """Sum of |w| kept by the 2:4 mask on the input channels in their original order."""
    return _kept_rows(magnitude_rows(weight))


def kept_permuted(weight, perm) -> float:
    """Sum of |w| kept by the 2:4 mask after reordering the input channels: new channel i is old ``perm[i]``."""
    rows = magnitude_rows(weight)
    return _kept_rows(rows[:, _check_perm(perm, rows.shape[1])])


def kept_unstructured(weight) -> float:
    """The unstructured 50% bound: per row of :func:`magnitude_rows`, the sum of its largest ``C/2`` values.

    Each row keeps as many weights as under 2:4 (half of ``C``) but anywhere along the row, so no permutation of
    the input channels can keep more. (This is the "50% rows" line of ASP's permutation tests, not the top half
    of the whole matrix.)
    """
    rows = magnitude_rows(weight)
    half = rows.shape[1] // 2
    return float(np.sort(rows, axis=1)[:, rows.shape[1] - half:].sum())


def _efficacy(plain: float, permuted: float, unstructured: float) -> float:
    headroom = unstructured - plain
    if headroom <= 1e-12 * max(unstructured, 1e-300):
        return 0.0  # the plain 2:4 mask already keeps all it could: nothing for a permutation to win
    return 100.0 * (permuted - plain) / headroom


def efficacy(weight, perm) -> float:
    """``100 * (kept_permuted - kept_plain) / (kept_unstructured - kept_plain)``, in percent.

    0 means no better than the original channel order, 100 means the permutation closes the whole gap to the
    unstructured 50% bound of :func:`kept_unstructured` (rarely reachable); negative means worse than the
    original order. A weight whose plain 2:4 mask already reaches the bound has efficacy 0 by definition.
    """
    return _efficacy(kept_plain(weight), kept_permuted(weight, perm), kept_unstructured(weight))


def apply_permutation(weight, perm, axis: int):
    """``weight`` reordered along ``axis`` so that index i holds old index ``perm[i]`` (numpy array or tensor).

    Use ``axis=1`` on the consumer (the layer whose input channels were searched) and ``axis=0`` on the
    producer's weight and its bias (and on any per-channel tensor in between, such as a BatchNorm's).
    """
    perm = np.asarray(perm, dtype=np.int64)
    if hasattr(weight, "index_select"):  # a torch tensor; torch is only imported when given one
        import torch

        return weight.index_select(axis, torch.as_tensor(perm, device=weight.device))
    return np.take(np.asarray(weight), perm, axis=axis)


# --------------------------------------------------------------------------------------------------------------
# search
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PermutationResult:
    """A searched input-channel order: new position i takes old channel ``perm[i]``."""

    perm: np.ndarray
    kept_plain: float
    kept_permuted: float
    kept_unstructured: float
    efficacy: float  # percent, see :func:`efficacy`
    seconds: float
    iterations: int  # rounds done (annealing and greedy): each round re-partitions up to C/8 pairs of stripes
    scorer: str = "numpy"  # what scored the splits: "numpy", or "kernel:" and the kernel scorer's path (plain
    # "kernel" when the search returned before scoring)


# Two stripes hold 8 columns; a split into two stripes is one of the 35 4-subsets that contain column 0 (its
# complement is the other stripe). Split 0 is the current stripes {0,1,2,3} | {4,5,6,7}.
_PAIRS = list(itertools.combinations(range(2 * GROUP), 2))  # 28 column pairs
_PAIR_INDEX = {p: i for i, p in enumerate(_PAIRS)}
_PAIR_FIRST = np.array([p[0] for p in _PAIRS])
_PAIR_SECOND = np.array([p[1] for p in _PAIRS])
_SPLITS = [s for s in itertools.combinations(range(2 * GROUP), GROUP) if s[0] == 0]
_SPLIT_COLUMNS = np.array([list(s) + [c for c in range(2 * GROUP) if c not in s] for s in _SPLITS])  # [35, 8]
# the 70 stripes of all splits (split j: stripes 2j and 2j+1), each as two column pairs (a, b) and (c, d)
_STRIPES = _SPLIT_COLUMNS.reshape(-1, GROUP)
_HALF_A = np.array([_PAIR_INDEX[(s[0], s[1])] for s in _STRIPES])
_HALF_B = np.array([_PAIR_INDEX[(s[2], s[3])] for s in _STRIPES])
assert GROUP == 4 and KEEP == 2 and len(_SPLITS) == 35  # the scoring below is written for 2:4

# work model behind the default schedule (fitted on a shared 2-core AMD EPYC with margin for load): seconds per
# annealing round = overhead + per element of the [pairs, 70, rows] score tensors
_ROUND_OVERHEAD_S = 5.0e-5
_ELEMENT_S = 1.8e-9
_ANNEAL_SHARE = 0.8  # of the budget, planned for annealing; the rest is for the greedy finish
_MAX_ROUNDS = 200_000
_ROUNDS_PER_STRIPE_PAIR = 1000
_MIN_ROUNDS_PER_STRIPE = 10
_BLOCK_ELEMENTS = 131_072  # per [pairs, 70, rows] temporary
_T_START, _T_END = 0.3, 0.02  # temperatures, in units of the spread of the split scores at the start


class _SplitScorer:
    """Scores all 35 splits of many stripe pairs at once: ``[pairs, 8] column ids -> [pairs, 35]`` kept sums.

    Rows are processed in blocks so the ``[pairs, 70, block]`` temporaries stay in cache.
    """

    def __init__(self, columns: np.ndarray, max_pairs: int, block_elements: int = _BLOCK_ELEMENTS):
        rows = columns.shape[1]  # columns: [C, rows] float32, one row per input channel
        block = max(1, min(rows, block_elements // (max(1, max_pairs) * len(_STRIPES))))
        self.blocks = [np.ascontiguousarray(columns[:, r:r + block]) for r in range(0, rows, block)]
        self.a = np.empty((max_pairs, len(_PAIRS), block), np.float32)
        self.b, self.sums, self.maxes = (np.empty_like(self.a) for _ in range(3))
        self.u = np.empty((max_pairs, len(_STRIPES), block), np.float32)
        self.v, self.w = np.empty_like(self.u), np.empty_like(self.u)
        self.total = np.empty((max_pairs, len(_STRIPES)), np.float64)

    def __call__(self, cols8: np.ndarray) -> np.ndarray:
        n = cols8.shape[0]
        total = self.total[:n]
        total[:] = 0.0
        for columns in self.blocks:
            width = columns.shape[1]
            a, b, sums, maxes, u, v, w = (t[:n, :, :width] for t in (self.a, self.b, self.sums, self.maxes, self.u,
                                                                      self.v, self.w))
            x = columns[cols8]  # [n, 8, width]
            np.take(x, _PAIR_FIRST, axis=1, out=a)
            np.take(x, _PAIR_SECOND, axis=1, out=b)
            np.add(a, b, out=sums)
            np.maximum(a, b, out=maxes)
            # top-2 sum of a stripe {a,b,c,d} = max(a+b, c+d, max(a,b) + max(c,d)): the two largest are either one
            # of the pairs or the larger of each pair
            np.take(sums, _HALF_A, axis=1, out=u)
            np.take(sums, _HALF_B, axis=1, out=v)
            np.maximum(u, v, out=u)
            np.take(maxes, _HALF_A, axis=1, out=v)
            np.take(maxes, _HALF_B, axis=1, out=w)
            np.add(v, w, out=v)
            np.maximum(u, v, out=u)
            total += u.sum(axis=-1)  # [n, 70], float32 per block, accumulated in float64
        return total[:, 0::2] + total[:, 1::2]


def _round_robin(n: int) -> list[np.ndarray]:
    """Rounds of disjoint pairs covering every pair of ``range(n)`` once (circle method; a bye when n is odd)."""
    slots = list(range(n + n % 2))
    rounds = []
    for _ in range(len(slots) - 1):
        pairs = [(slots[i], slots[-1 - i]) for i in range(len(slots) // 2)]
        rounds.append(np.array([p for p in pairs if max(p) < n], dtype=np.intp).reshape(-1, 2))
        slots = [slots[0], slots[-1], *slots[1:-1]]
    return rounds


def sorted_permutation(weight) -> np.ndarray:
    """The sort-only order: input channels ranked by L1 norm, stripe g given ranks 2g, 2g+1 (strong) and the two
    mirrored from the weak end, ``C-2-2g`` and ``C-1-2g``, so every run of 4 pairs two strong with two weak channels.

    Cheap and no search; on random matrices about as good as the identity, on real layers with weak or dead
    channels often much better. :func:`search_permutation` starts from it when it beats the identity.
    """
    return _sort_start(magnitude_rows(weight))


def _sort_start(rows: np.ndarray) -> np.ndarray:
    order = np.argsort(-rows.sum(axis=0), kind="stable")
    n = order.size
    g = np.arange(n // GROUP)
    return order[np.stack([2 * g, 2 * g + 1, n - 2 - 2 * g, n - 1 - 2 * g], axis=1).reshape(-1)]


def planned_rounds(shape: tuple[int, ...], time_budget_s: float) -> int:
    """Annealing rounds the work model plans for a weight of ``shape`` and a budget (deterministic).

    ``_ANNEAL_SHARE`` of the budget at the modelled seconds per round, at most ``_ROUNDS_PER_STRIPE_PAIR`` rounds
    per pair of stripes (small layers need few). None for 2 stripes, where one greedy round is exact, and none
    when the budget affords fewer than ``_MIN_ROUNDS_PER_STRIPE`` rounds per stripe: a schedule that short ends
    worse than spending the whole budget on the greedy descent (large layers on short budgets).
    """
    channels = shape[1]
    rows = int(np.prod(shape)) // channels
    stripes_n = channels // GROUP
    if stripes_n <= 2:
        return 0
    per_round = _ROUND_OVERHEAD_S + _ELEMENT_S * (stripes_n // 2) * len(_STRIPES) * rows
    cap = min(_MAX_ROUNDS, _ROUNDS_PER_STRIPE_PAIR * stripes_n * (stripes_n - 1) // 2)
    planned = int(min(cap, max(0.0, _ANNEAL_SHARE * time_budget_s / per_round)))
    return planned if planned >= _MIN_ROUNDS_PER_STRIPE * stripes_n else 0


SCORERS = ("numpy", "kernel")


def _make_scorer(scorer: str, columns: np.ndarray, max_pairs: int, device) -> tuple[Callable, str]:
    """The split scorer named ``scorer`` over ``columns [C, rows]`` and the path it runs on."""
    if scorer == "numpy":
        return _SplitScorer(columns, max_pairs), "numpy"
    from trt_prune.kernels.sparse24 import TorchSplitScorer  # torch and Triton only for this scorer

    kernel = TorchSplitScorer(columns, max_pairs, device=device)
    return kernel, f"kernel:{kernel.path}"


def search_permutation(weight, time_budget_s: float = 1.0, seed: int = 0,
                       rounds: int | None = None, scorer: str = "numpy", device=None) -> PermutationResult:
    """Search an input-channel order that keeps more magnitude under the 2:4 mask (see the module docstring).

    ``weight``: ``[out, in]`` or ``[K, C, ...]`` (numpy array or torch tensor), input channels on axis 1. Stops
    at ``time_budget_s`` (the clock is checked every round). ``rounds`` overrides the annealing schedule length
    that the work model plans from the budget and shape (see :func:`planned_rounds`); with ``rounds`` set and
    enough budget the result depends on ``seed`` alone. The returned ``perm`` never keeps less than the identity.

    ``scorer``: ``"numpy"`` (default) or ``"kernel"``, the Triton split-score kernel on ``device`` (a torch device;
    default CUDA when available, else the CPU, see the module docstring). The work model behind the planned rounds
    is the numpy scorer's: with ``"kernel"`` pass ``rounds`` (e.g. ``planned_rounds(shape, budget)``) and a
    budget that lets the schedule finish, to compare scorers schedule for schedule.
    """
    if scorer not in SCORERS:
        raise ValueError(f"scorer {scorer!r} is not one of {', '.join(SCORERS)}")
    if device is not None and scorer != "kernel":
        raise ValueError(f"device={device!r} is for scorer='kernel'; the {scorer} scorer runs on the CPU")
    start = time.perf_counter()
    deadline = start + max(0.0, float(time_budget_s))
    rows = magnitude_rows(weight)
    channels = rows.shape[1]
    stripes_n = channels // GROUP
    plain, bound = _kept_rows(rows), kept_unstructured(rows)
    identity = np.arange(channels)
    path = scorer

    def result(perm: np.ndarray, iterations: int) -> PermutationResult:
        kept = _kept_rows(rows[:, perm])
        if kept < plain:
            perm, kept = identity, plain
        return PermutationResult(perm, plain, kept, bound, _efficacy(plain, kept, bound),
                                 time.perf_counter() - start, iterations, path)

    tolerance = 1e-9 * float(rows.sum())  # gains below this are rounding noise
    reached = 1e-6 * float(rows.sum())  # float32 running gain this close to the bound: nothing left to win
    if stripes_n < 2 or bound - plain <= tolerance or time.perf_counter() >= deadline:
        return result(identity, 0)
    sorted_start = _sort_start(rows)
    kept_start = _kept_rows(rows[:, sorted_start])
    if kept_start > plain:
        state = sorted_start.reshape(stripes_n, GROUP).copy()
    else:
        state, kept_start = identity.reshape(stripes_n, GROUP).copy(), plain

    columns = np.ascontiguousarray(rows.T, dtype=np.float32)
    score, path = _make_scorer(scorer, columns, stripes_n // 2, device)
    rng = np.random.default_rng(seed)
    n_rounds = planned_rounds(rows.shape, time_budget_s) if rounds is None else max(0, int(rounds))
    anneal_deadline = start + _ANNEAL_SHARE * max(0.0, float(time_budget_s)) if rounds is None else deadline
    schedule = _round_robin(stripes_n)

    # greedy descent from the start: enough when it reaches the bound (e.g. layers with very few rows) and all the
    # search there is when the budget is too short for annealing (large layers)
    iterations, gain = _descend(state, score, schedule, deadline, tolerance)
    if kept_start + gain >= bound - reached or not n_rounds:
        return result(state.reshape(-1).copy(), iterations)

    # annealing: every round, a random perfect matching of the stripes, one Boltzmann-sampled split per pair
    best, best_gain = state.copy(), gain
    pairs = rng.permutation(stripes_n)[: stripes_n // 2 * 2].reshape(-1, 2)
    first = score(np.concatenate([state[pairs[:, 0]], state[pairs[:, 1]]], axis=1))
    spread = float(np.std(first - first[:, :1])) or 1.0
    t_start, t_end = _T_START * spread, _T_END * spread
    for k in range(n_rounds):
        if time.perf_counter() >= anneal_deadline or kept_start + best_gain >= bound - reached:
            break
        temperature = t_start * (t_end / t_start) ** (k / n_rounds)
        pairs = rng.permutation(stripes_n)[: stripes_n // 2 * 2].reshape(-1, 2)
        cols8 = np.concatenate([state[pairs[:, 0]], state[pairs[:, 1]]], axis=1)
        values = score(cols8)
        pick = np.argmax(values / temperature + rng.gumbel(size=values.shape), axis=1)
        gain += float((values[np.arange(len(pick)), pick] - values[:, 0]).sum())
        moved = np.take_along_axis(cols8, _SPLIT_COLUMNS[pick], axis=1)
        state[pairs[:, 0]], state[pairs[:, 1]] = moved[:, :GROUP], moved[:, GROUP:]
        iterations += 1
        if gain > best_gain:
            best_gain, best = gain, state.copy()

    # greedy finish from the best state seen
    more, _ = _descend(best, score, schedule, deadline, tolerance)
    return result(best.reshape(-1).copy(), iterations + more)


def _descend(state: np.ndarray, score: Callable[[np.ndarray], np.ndarray], schedule: list[np.ndarray], deadline: float,
             tolerance: float) -> tuple[int, float]:
    """Move every pair of a round-robin round to its best split, in place, until a whole round-robin passes
    without an improvement (a local optimum of the 8-column neighbourhood) or the deadline; (rounds, gain)."""
    quiet = step = 0
    gain = 0.0
    while quiet < len(schedule) and time.perf_counter() < deadline:
        pairs = schedule[step % len(schedule)]
        step += 1
        cols8 = np.concatenate([state[pairs[:, 0]], state[pairs[:, 1]]], axis=1)
        values = score(cols8)
        pick = np.argmax(values, axis=1)
        delta = values[np.arange(len(pick)), pick] - values[:, 0]
        better = delta > tolerance
        if not better.any():
            quiet += 1
            continue
        quiet = 0
        gain += float(delta[better].sum())
        moved = np.take_along_axis(cols8[better], _SPLIT_COLUMNS[pick[better]], axis=1)
        state[pairs[better, 0]], state[pairs[better, 1]] = moved[:, :GROUP], moved[:, GROUP:]
    return step, gain
