"""Choosing kept channel counts per coupled group to meet a latency budget.

The formulation is HALP's (Shen et al., NeurIPS 2022), written for our channel graph: each prunable group offers
one *option* per kept count (multiples of ``round_to``, down to what ``max_ratio`` allows; split groups keep
equal counts per segment). An option's *value* is a concave function (``utility``, default ``quadratic``; HALP's
is linear) of the importance of the channels it keeps (the group's best ones, as a share of the group's total:
every coupled group is worth the same, since no magnitude criterion can say that one group matters more than
another, and a criterion of any scale compares); its *cost* is the
latency the latency model predicts for the layers the group touches, with every other group at its current
count. A multiple-choice knapsack (one option per group, dynamic programming over the budget cut into
``bins`` steps) keeps the most value under the budget.

A layer's time depends on two groups at once (its inputs and its outputs), so costs taken one group at a time
are a linearisation. The planner therefore iterates: solve, move the linearisation point to the solution,
solve again (a few rounds), then repairs with exact predictions: while the plan is over budget it drops the
chunk of ``round_to`` channels with the least value per millisecond saved, and while there is room it gives
back the chunk with the most value per millisecond spent. The final plan's predicted latency is
therefore at or under the budget by construction.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

import numpy as np

from ..errors import LatencyError
from ..pruning.graph import ChannelGroup
from ..pruning.structured import _aligned_keep
from .model import LatencyModel

# No group loses more than this share of its channels unless the caller says otherwise. Magnitude importance is
# nearly flat inside a group, so the knapsack's values are nearly linear in the kept count and it strips whole
# groups where a channel costs the most time: on the demo detector at 0.6x latency it cut the stem, stage 1-2
# and the finest head level to 8 channels, and after 250 fine-tune steps mAP was 0.414 against 0.730 for
# uniform L1 (bench/results/latency_vs_macs.md, first run).
DEFAULT_MAX_RATIO = 0.5

# How an option's value grows with the share of the group's importance it keeps (``f`` in (0, 1]). HALP's value
# is linear (``f``); with it the knapsack strips the groups where a channel costs the most time to the cap and
# leaves the rest whole. A concave value makes each further cut of a group worth less than the one before, so
# the cuts spread over more groups. Quadratic (the loss grows with the square of the share cut) recovered the
# most accuracy after fine-tuning on the demo detector, with L1 and with Taylor importance: the "planner's
# utility" table in bench/results/latency_vs_macs.md.
UTILITIES = {
    "linear": lambda f: f,
    "log": lambda f: np.log(np.maximum(f, 1e-12)),
    "quadratic": lambda f: -((1.0 - f) ** 2),
}
DEFAULT_UTILITY = "quadratic"


@dataclass
class _Group:
    group: ChannelGroup
    options: np.ndarray  # kept count per segment, ascending
    shares: np.ndarray  # share of the group's importance kept at each option
    values: np.ndarray  # the utility of that share: what the knapsack maximises
    rank: np.ndarray  # per position of the group: its rank inside its segment (0 = most important)
    order: list[np.ndarray]  # per segment: positions, most important first


def _options(g: ChannelGroup, scores: np.ndarray, round_to: int, max_ratio: float | None,
             utility: str = DEFAULT_UTILITY) -> _Group:
    segs = [np.asarray(s) for s in (g.segments or [list(range(g.size))])]
    n = len(segs[0])
    lowest = _aligned_keep(n, 1.0 - 1e-9, round_to, max_ratio) if n > round_to else n
    counts = sorted({k for k in range(round_to, n + 1, round_to) if k >= lowest} | {n})
    total = float(scores.sum()) if scores.size else 0.0
    normed = scores / total if total > 0 else np.full(scores.shape, 1.0 / max(1, scores.size))
    rank = np.zeros(g.size, dtype=np.int64)
    order, cum = [], np.zeros(n + 1)
    for seg in segs:
        o = seg[np.argsort(-normed[seg], kind="stable")]
        order.append(o)
        rank[o] = np.arange(len(o))
        cum[1:] += np.cumsum(normed[o])
    opts = np.asarray(counts, dtype=np.int64)
    shares = np.minimum(cum[opts], 1.0)
    return _Group(g, opts, shares, UTILITIES[utility](shares), rank, order)


class LatencyPlanner:
    """Plans for one traced graph and one latency model; reusable across budgets and importance updates."""

    def __init__(self, model: LatencyModel, groups: list[ChannelGroup], round_to: int = 8,
                 max_ratio: float | None = DEFAULT_MAX_RATIO, bins: int = 4000, utility: str = DEFAULT_UTILITY):
        if utility not in UTILITIES:
            raise LatencyError(f"unknown planner utility {utility!r}; choose one of {', '.join(UTILITIES)}")
        self.utility = utility
        self.model = model
        self.groups = groups
        self.round_to = round_to
        self.max_ratio = max_ratio
        self.bins = bins
        graph = model.graph
        n = len(graph.root)
        self.group_of = np.full(n, -1, dtype=np.int64)
        self.pos_of = np.zeros(n, dtype=np.int64)
        for i, g in enumerate(groups):
            cls = np.asarray(g.classes, dtype=np.int64)
            self.group_of[cls] = i
            self.pos_of[cls] = np.arange(len(cls))
        # per layer and side: the channels no group prunes, and per group the positions it contributes
        self.sides = []
        self.touch: list[set[int]] = [set() for _ in groups]
        for li, u in enumerate(model.layers):
            sides = []
            for classes, dense in ((u.in_classes, u.dense_in), (u.out_classes, u.dense_out)):
                if classes is None:
                    sides.append((dense, {}))
                    continue
                gi = self.group_of[classes]
                parts = {}
                for i in np.unique(gi[gi >= 0]).tolist():
                    parts[i] = self.pos_of[classes[gi == i]]
                    self.touch[i].add(li)
                sides.append((int((gi < 0).sum()), parts))
            self.sides.append(sides)
        self.dense_ms = model.predict()
        # groups whose costs change when group i moves: those sharing a layer with it
        self.neighbours = [{j for j, other in enumerate(self.touch) if other & mine} for mine in self.touch]

    # ---------------------------------------------------------------- counts and exact predictions
    def _side_count(self, side, ks: dict[int, int], st: list[_Group]) -> int:
        """Channels a layer side keeps: the fixed ones, plus per group how many of its positions there rank
        below the group's kept count (``_ranks`` holds those ranks sorted, so this is a binary search)."""
        fixed, parts = side
        total = fixed
        for i in parts:
            total += bisect.bisect_left(self._ranks[(id(side), i)], ks[i])
        return total

    def _sort_ranks(self, st: list[_Group]) -> None:
        self._ranks = {}
        for sides in self.sides:
            for side in sides:
                for i, pos in side[1].items():
                    self._ranks[(id(side), i)] = sorted(st[i].rank[pos].tolist())

    def _layer_ms(self, li: int, ks, st) -> tuple[float, float]:
        u = self.model.layers[li]
        c_in = self._side_count(self.sides[li][0], ks, st)
        if u.sig.one_axis:
            return self.model.layer_ms_at(li, c_in, 0), u.out_elements * c_in
        c_out = self._side_count(self.sides[li][1], ks, st)
        return self.model.layer_ms_at(li, c_in, c_out), u.out_elements * c_out

    def predict(self, ks: dict[int, int], st: list[_Group]) -> float:
        total, act = 0.0, 0.0
        for li in range(len(self.model.layers)):
            ms, a = self._layer_ms(li, ks, st)
            total += ms
            act += a
        m = self.model
        return total + m.constant_ms + m.per_activation_ms * (act / m.dense_activation if m.dense_activation else 1)

    def _local(self, i: int, ks, st) -> float:
        """Time of the layers group ``i`` touches (plus their activation share of the rest)."""
        m = self.model
        scale = m.per_activation_ms / m.dense_activation if m.dense_activation else 0.0
        total = 0.0
        for li in self.touch[i]:
            ms, a = self._layer_ms(li, ks, st)
            total += ms + scale * a
        return total

    # ---------------------------------------------------------------- planning
    def plan(self, scores: dict[str, np.ndarray], budget_ms: float, iterations: int = 4
             ) -> tuple[dict[str, list[int]], dict]:
        """Kept positions per group (only groups that lose channels) whose predicted latency is at most
        ``budget_ms``, keeping the most importance; and a summary of the planning."""
        t0 = time.perf_counter()
        st = [_options(g, np.asarray(scores[g.key], dtype=float), self.round_to, self.max_ratio, self.utility)
              for g in self.groups]
        self._sort_ranks(st)
        full = {i: int(s.options[-1]) for i, s in enumerate(st)}
        least = {i: int(s.options[0]) for i, s in enumerate(st)}
        floor_ms = self.predict(least, st)
        if budget_ms < floor_ms - 1e-9:
            raise LatencyError(f"a latency budget of {budget_ms:.3f} ms cannot be met: the smallest this model "
                               f"reaches with round_to={self.round_to}"
                               f"{'' if self.max_ratio is None else f', max_ratio={self.max_ratio}'} is "
                               f"{floor_ms:.3f} ms (dense {self.dense_ms:.3f} ms, so at least "
                               f"{floor_ms / self.dense_ms:.3f} of dense); raise the budget")
        ks = dict(full)
        best = None
        for _ in range(iterations):
            new = self._knapsack(st, ks, budget_ms)
            if new is None:
                break
            pred = self.predict(new, st)
            value = sum(float(st[i].values[np.searchsorted(st[i].options, k)]) for i, k in new.items())
            if pred <= budget_ms and (best is None or value > best[0]):
                best = (value, dict(new))
            if new == ks:
                break
            ks = new
        ks = best[1] if best is not None else ks
        ks = self._repair(st, ks, budget_ms)
        pred = self.predict(ks, st)
        plan = {}
        for i, s in enumerate(st):
            k = ks[i]
            if k < full[i]:
                plan[s.group.key] = sorted(int(p) for seg in s.order for p in seg[:k])
        kept_share = float(np.mean([st[i].shares[np.searchsorted(st[i].options, k)] for i, k in ks.items()]))
        info = {"budget_ms": round(budget_ms, 5), "predicted_ms": round(pred, 5), "dense_ms": round(self.dense_ms, 5),
                "floor_ms": round(floor_ms, 5), "importance_kept": round(kept_share, 5), "utility": self.utility,
                "groups_cut": len(plan), "seconds": round(time.perf_counter() - t0, 4)}
        return plan, info

    def _knapsack(self, st: list[_Group], ks: dict[int, int], budget_ms: float) -> dict[int, int] | None:
        now = self.predict(ks, st)
        deltas, base = [], 0.0
        for i, s in enumerate(st):
            here = self._local(i, ks, st)
            d = np.empty(len(s.options))
            for j, k in enumerate(s.options.tolist()):
                trial = dict(ks)
                trial[i] = k
                d[j] = self._local(i, trial, st) - here
            deltas.append(d - d.min())
            base += d.min()
        capacity = budget_ms - now - base
        if capacity <= 0:
            return {i: int(s.options[0]) for i, s in enumerate(st)}
        step = capacity / self.bins
        dp = np.zeros(self.bins + 1)
        choice = np.zeros((len(st), self.bins + 1), dtype=np.int32)
        for i, s in enumerate(st):
            cost = np.ceil(deltas[i] / step - 1e-9).astype(np.int64)
            new = np.full(self.bins + 1, -np.inf)
            for j in range(len(s.options)):
                c = int(cost[j])
                if c > self.bins:
                    continue
                cand = np.full(self.bins + 1, -np.inf)
                cand[c:] = dp[:self.bins + 1 - c] + s.values[j]
                better = cand > new
                new[better] = cand[better]
                choice[i][better] = j
            dp = new
        if not np.isfinite(dp[-1]):
            return None
        out, b = {}, self.bins
        for i in range(len(st) - 1, -1, -1):
            j = int(choice[i][b])
            out[i] = int(st[i].options[j])
            b -= int(np.ceil(deltas[i][j] / step - 1e-9))
        return out

    def _repair(self, st: list[_Group], ks: dict[int, int], budget_ms: float) -> dict[int, int]:
        ks = dict(ks)
        pred = self.predict(ks, st)
        cache: dict[tuple[int, int], tuple[int, float, float] | None] = {}

        def move(i: int, direction: int):
            """(new count, ms change, importance change) of moving group ``i`` one option; cached until a
            neighbouring group moves."""
            if (i, direction) not in cache:
                s = st[i]
                j = int(np.searchsorted(s.options, ks[i])) + direction
                if not 0 <= j < len(s.options):
                    cache[(i, direction)] = None
                else:
                    trial = dict(ks)
                    trial[i] = int(s.options[j])
                    dt = self._local(i, trial, st) - self._local(i, ks, st)
                    cache[(i, direction)] = (int(s.options[j]), dt, float(s.values[j] - s.values[j - direction]))
            return cache[(i, direction)]

        def moved(i: int, k: int) -> None:
            ks[i] = k
            for j in self.neighbours[i] | {i}:
                cache.pop((j, -1), None)
                cache.pop((j, +1), None)

        while pred > budget_ms + 1e-9:  # over budget: drop the cheapest importance per ms saved
            cands = []
            for i in range(len(st)):
                m = move(i, -1)
                if m is not None and m[1] < 0:  # m[2] <= 0: the importance the move loses
                    cands.append((-m[2] / -m[1], i, m[0]))
            if not cands:
                break
            _, i, k = min(cands)
            moved(i, k)
            pred = self.predict(ks, st)
        while True:  # room left: give back the most importance per ms spent that still fits
            cands = []
            for i in range(len(st)):
                m = move(i, +1)
                if m is not None and pred + m[1] <= budget_ms:
                    cands.append((m[2] / max(m[1], 1e-9), i, m[0]))
            done = False
            for _, i, k in sorted(cands, reverse=True):
                trial = dict(ks)
                trial[i] = k
                if self.predict(trial, st) <= budget_ms:
                    moved(i, k)
                    pred, done = self.predict(ks, st), True
                    break
            if not done:
                break
        return ks
