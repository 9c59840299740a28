"""ScoreStats: the streamed float64 sums behind every score of `scores`, batch by
batch, mergeable across processes (all_reduce) and saved and restored exactly."""

from __future__ import annotations

import torch

from ..errors import TransferFastError
from .score_formulas import (
    add_tables,
    hscore_from_state,
    leep_from,
    logme_from_state,
    nce_from_table,
    regularized_hscore_from_state,
    shift_class_grams_,
    shift_moments,
    transrate_from_state,
)
from .score_inputs import (
    MAX_CLASSES,
    MAX_STATE_BYTES,
    check_state_bytes,
    features_of,
    labels_of,
    probs_of,
)

_CLASS_DIM = {"count": 0, "class_sum": 0, "class_gram": 0, "hard": 1, "soft": 1}


class ScoreStats:
    """Streamed float64 sums from which `compute()` gives every score of `scores` exactly.

    Memory (float64, on the device of the first batch or `device`): C*(D+1) + D^2 + 2D; with
    per_class_gram (TransRate) C*D^2*8 bytes more; with source_probs two (C_s, C) tables; with
    keep_source_probs (LEEP) every sample's source probabilities, N*C_s*4 bytes (float32; 8 if
    given as float64) and its label (N*8 bytes). LEEP needs them because P(y | z) is known only
    after the last batch. Statistics beyond MAX_STATE_BYTES (without kept probabilities) are
    refused. Classes grow with the labels seen unless `num_classes` fixes them.

    Args:
        num_features: D, checked against every batch (None: the first batch's).
        num_classes: C, labels must lie in [0, C) (None: grows to max label + 1).
        device: where the sums live (None: the first batch's device).
        keep_source_probs: keep per-sample source probabilities, so that compute() has LEEP.
        per_class_gram: keep per-class Grams (C, D, D), so that compute() has TransRate.
        transrate_eps: TransRate's distortion eps.
    """

    def __init__(self, num_features: int | None = None, num_classes: int | None = None, *,
                 device=None, keep_source_probs: bool = True, per_class_gram: bool = True,
                 transrate_eps: float = 1e-4):
        if num_features is not None and num_features < 1:
            raise TransferFastError(f"num_features={num_features}: expected >= 1")
        if num_classes is not None and not 1 <= num_classes <= MAX_CLASSES:
            raise TransferFastError(f"num_classes={num_classes}: expected 1..{MAX_CLASSES}")
        if not transrate_eps > 0:
            raise TransferFastError(f"transrate_eps={transrate_eps}: expected > 0")
        self._dim, self._fixed_classes = num_features, num_classes
        self.device = None if device is None else torch.device(device)
        self.keep_source_probs, self.per_class_gram = keep_source_probs, per_class_gram
        self.transrate_eps = transrate_eps
        self.reset()

    def reset(self) -> None:
        """Forget every sample (the constructor's arguments stay)."""
        self._s: dict[str, torch.Tensor] = {}  # empty until the first sample
        self._classes = self._fixed_classes or 0
        self._source: int | None = None  # C_s; 0: batches without source_probs; None: unknown
        self._probs: list[torch.Tensor] = []
        self._prob_labels: list[torch.Tensor] = []

    @property
    def num_features(self) -> int | None:
        return self._s["shift"].shape[0] if self._s else self._dim

    @property
    def num_classes(self) -> int:
        return self._classes

    @property
    def count(self) -> int:
        return int(self._s["count"].sum()) if self._s else 0

    def update(self, features, labels, source_probs=None) -> None:
        """Add a batch. The statistics change only if every check passes.

        Args:
            features: (B, D) real, finite; any device (moved to the statistics' device).
            labels: integer (B,) in [0, num_classes) (or [0, MAX_CLASSES)).
            source_probs: optional (B, C_s) source-model probabilities (rows sum to 1), for
                NCE (argmax) and LEEP; give them for every batch or for none.

        Raises:
            TransferFastError: a shape, dtype or value that does not fit.
        """
        dev = self.device or (self._s["shift"].device if self._s else None)
        x = features_of(features, dev)
        b, d = x.shape
        if self.num_features is not None and d != self.num_features:
            raise TransferFastError(f"features of shape {tuple(x.shape)}: expected "
                                    f"(B, {self.num_features}) as before")
        y = labels_of(labels, b, self._fixed_classes, x.device)
        p = None if source_probs is None else probs_of(source_probs, b, self._source, x.device)
        if self._source is not None and bool(self._source) != (p is not None):
            raise TransferFastError("source_probs must be given for every batch or for none: "
                                    f"this batch {'has' if p is not None else 'lacks'} them")
        if b == 0:
            return
        cs = 0 if p is None else p.shape[1]
        c = max(self._classes, int(y.max()) + 1)
        check_state_bytes(c, d, cs, self.per_class_gram)
        if not self._s:
            self._allocate(x.mean(0), cs)
        self._grow(c)
        self._add(x - self._s["shift"], y, p)

    def _allocate(self, shift: torch.Tensor, num_source: int) -> None:
        d = shift.shape[0]

        def zeros(*shape):
            return torch.zeros(shape, dtype=torch.float64, device=shift.device)

        self._s = {"shift": shift, "count": zeros(0), "class_sum": zeros(0, d),
                   "gram": zeros(d, d), "q3": zeros(d), "q4": zeros()}
        if self.per_class_gram:
            self._s["class_gram"] = zeros(0, d, d)
        if num_source:
            self._s["hard"], self._s["soft"] = zeros(num_source, 0), zeros(num_source, 0)
        self._source = num_source

    def _resize(self, capacity: int) -> None:
        """Class capacity exactly `capacity` (>= num_classes) for every per-class tensor."""
        for key, dim in _CLASS_DIM.items():
            if key in self._s:
                t = self._s[key].narrow(dim, 0, min(capacity, self._s[key].shape[dim]))
                shape = list(t.shape)
                shape[dim] = capacity - shape[dim]
                self._s[key] = torch.cat([t, t.new_zeros(shape)], dim)

    def _grow(self, c: int) -> None:
        cap = self._s["count"].shape[0]
        if c > cap:  # doubling: log2(C) copies when labels arrive in increasing order
            d, cs = self._s["shift"].shape[0], self._source or 0
            per_class = 8 * (1 + d + (d * d if self.per_class_gram else 0) + 2 * cs)
            fits = (MAX_STATE_BYTES - 8 * d * d) // per_class
            self._resize(max(c, min(2 * cap, fits, self._fixed_classes or MAX_CLASSES)))
        self._classes = max(self._classes, c)

    def _add(self, xs: torch.Tensor, y: torch.Tensor, p: torch.Tensor | None) -> None:
        s = self._s
        s["count"] += torch.bincount(y, minlength=s["count"].shape[0]).to(torch.float64)
        s["class_sum"].index_add_(0, y, xs)
        s["gram"].addmm_(xs.T, xs)
        sq = (xs * xs).sum(1)
        s["q3"] += sq @ xs
        s["q4"] += sq @ sq
        if "class_gram" in s:
            for k in torch.unique(y).tolist():
                xk = xs[y == k]
                s["class_gram"][k].addmm_(xk.T, xk)
        if p is not None:
            add_tables(s["hard"], s["soft"], p.argmax(1), p, y)
            if self.keep_source_probs:  # copies: the caller may reuse its buffers
                self._probs.append(p.clone())
                self._prob_labels.append(y.clone())

    def _live(self) -> dict:
        """The sums, class tensors cut to num_classes; needs N >= 2."""
        if self.count < 2:
            raise TransferFastError(f"scores need at least 2 samples, got {self.count}")
        c = self._classes
        return {k: (t.narrow(_CLASS_DIM[k], 0, c) if k in _CLASS_DIM else t)
                for k, t in self._s.items()}

    def compute(self) -> dict[str, float]:
        """Scores of every sample so far, equal to the in-memory functions up to rounding.

        Returns:
            {"logme", "hscore", "regularized_hscore"} plus "transrate" with per_class_gram,
            "nce" with source_probs, and "leep" with source_probs and keep_source_probs.

        Raises:
            TransferFastError: fewer than 2 samples.
        """
        s = self._live()
        out = {"logme": logme_from_state(s), "hscore": hscore_from_state(s),
               "regularized_hscore": regularized_hscore_from_state(s)}
        if "class_gram" in s:
            out["transrate"] = transrate_from_state(s, self.transrate_eps)
        if "hard" in s:
            out["nce"] = nce_from_table(s["hard"])
            if self.keep_source_probs:
                out["leep"] = leep_from(s["soft"], self._probs, self._prob_labels)
        return out

    def state_dict(self) -> dict:
        """Settings, sizes and tensors (class dimensions cut to num_classes; views, not copies)."""
        c = self._classes
        sums = {k: (t.narrow(_CLASS_DIM[k], 0, c) if k in _CLASS_DIM else t)
                for k, t in self._s.items()}
        return {"num_classes": c, "source_classes": self._source, "sums": sums,
                "keep_source_probs": self.keep_source_probs, "probs": list(self._probs),
                "prob_labels": list(self._prob_labels)}

    def _check_state(self, state: dict, with_ours: bool) -> None:
        """TransferFastError unless `state` can join these settings (and, with_ours, our sums)."""
        sums, cs = state["sums"], state["source_classes"]
        if not sums:
            return
        d, theirs = sums["shift"].shape[0], f"{sums['shift'].shape[0]} features, {cs} source"
        if with_ours and self._s and (d != self.num_features or cs != self._source):
            raise TransferFastError(f"cannot merge statistics of {theirs} classes into "
                                    f"{self.num_features} features, {self._source} source classes")
        limit = self._fixed_classes or MAX_CLASSES
        if self._dim not in (None, d) or state["num_classes"] > limit:
            raise TransferFastError(f"statistics of {theirs} classes and {state['num_classes']} "
                                    f"classes do not fit num_features={self._dim}, "
                                    f"num_classes={self._fixed_classes}")
        if self.per_class_gram and "class_gram" not in sums:
            raise TransferFastError("statistics without class Grams cannot join "
                                    "per_class_gram=True")
        if self.keep_source_probs and cs and not state["keep_source_probs"]:
            raise TransferFastError("statistics without source probabilities cannot join "
                                    "keep_source_probs=True (LEEP would miss their samples)")

    def load_state_dict(self, state: dict) -> None:
        """Replace the statistics by copies of `state` (from state_dict) on this one's device
        (kept source probabilities are shared: they are never changed in place).

        Raises:
            TransferFastError: state that does not fit these settings.
        """
        self._check_state(state, with_ours=False)
        self.reset()
        self._s = {k: t.to(self.device or t.device, copy=True) for k, t in state["sums"].items()
                   if k != "class_gram" or self.per_class_gram}
        self._classes = max(self._classes, state["num_classes"])
        self._source = state["source_classes"]
        if self._s:
            self._resize(self._classes)
        if self.keep_source_probs:
            dev = self._s["shift"].device if self._s else None
            self._probs = [t.to(dev) for t in state["probs"]]
            self._prob_labels = [t.to(dev) for t in state["prob_labels"]]

    def merge(self, other: ScoreStats) -> ScoreStats:
        """A new ScoreStats of both sample sets, with self's settings; neither input changes.

        Raises:
            TransferFastError: other has a different D or C_s, or lacks what self's settings
                need (class Grams, kept source probabilities).
        """
        out = ScoreStats(self._dim, self._fixed_classes, device=self.device,
                         keep_source_probs=self.keep_source_probs,
                         per_class_gram=self.per_class_gram, transrate_eps=self.transrate_eps)
        out.load_state_dict(self.state_dict())
        out._absorb(other.state_dict())
        return out

    def _reshift_(self, delta: torch.Tensor) -> None:
        """In place: the sums about shift + delta."""
        s = self._s
        if "class_gram" in s:
            shift_class_grams_(s["class_gram"], s["class_sum"], s["count"], delta)
        s.update(shift_moments(s, delta))

    def all_reduce(self, group=None) -> ScoreStats:
        """In place on every rank: the statistics of all ranks' samples (torch.distributed).

        Ranks agree on num_classes (the largest), move their sums to one common shift and sum
        them with all_reduce (float64, on the statistics' device: CUDA under NCCL); kept source
        probabilities are all-gathered in rank order. Every rank must call it; a no-op when
        torch.distributed is not initialised.

        Raises:
            TransferFastError: ranks with different D, C_s, per_class_gram or keep_source_probs.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        nccl = dist.get_backend(group) == "nccl"
        dev = self._s["shift"].device if self._s else self.device or (
            torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu"))
        world = dist.get_world_size(group)
        meta = torch.tensor([self.num_features or 0, self._classes,
                             -1 if self._source is None else self._source, self.per_class_gram,
                             self.keep_source_probs,
                             max((t.element_size() for t in self._probs), default=0)], device=dev)
        metas = [torch.empty_like(meta) for _ in range(world)]
        dist.all_gather(metas, meta, group=group)
        metas = torch.stack(metas).tolist()
        dims, sources = {m[0] for m in metas if m[0]}, {m[2] for m in metas if m[2] >= 0}
        if len(dims) > 1 or len(sources) > 1 or len({tuple(m[3:5]) for m in metas}) > 1:
            raise TransferFastError("ranks disagree on (features, classes, source classes, "
                                    f"per_class_gram, keep_source_probs): {[m[:5] for m in metas]}")
        if not sources:
            return self
        d, c, cs = dims.pop(), max(m[1] for m in metas), sources.pop()
        check_state_bytes(c, d, cs, self.per_class_gram)
        if not self._s:
            self._allocate(torch.zeros(d, dtype=torch.float64, device=dev), cs)
        self._classes = c
        self._resize(c)
        n = self._s["count"].sum()
        weighted = torch.cat([n * self._s["shift"], n.view(1)])
        dist.all_reduce(weighted, group=group)
        self._reshift_(weighted[:-1] / weighted[-1] - self._s["shift"])
        for key in sorted(self._s):
            if key != "shift":
                dist.all_reduce(self._s[key], group=group)
        if self.keep_source_probs and cs:
            dtype = torch.float64 if max(m[5] for m in metas) == 8 else torch.float32
            p = [t.to(dtype) for t in self._probs] or [torch.zeros(0, cs, dtype=dtype, device=dev)]
            y = self._prob_labels or [torch.zeros(0, dtype=torch.int64, device=dev)]
            self._probs = [_gather_rows(torch.cat(p), group, world)]
            self._prob_labels = [_gather_rows(torch.cat(y), group, world)]
        return self

    def _absorb(self, o: dict) -> None:
        """In place: add the sums of state `o` after moving them to our shift."""
        self._check_state(o, with_ours=True)
        if not o["sums"]:
            return
        if not self._s:
            self.load_state_dict(o)
            return
        dev, c = self._s["shift"].device, o["num_classes"]
        check_state_bytes(max(c, self._classes), self.num_features, self._source,
                     self.per_class_gram)
        self._grow(c)
        probs, labels = o["probs"], o["prob_labels"]
        o = {k: t.to(dev) for k, t in o["sums"].items()}
        delta = self._s["shift"] - o["shift"]
        moved = shift_moments(o, delta)
        for key, t in self._s.items():
            if key == "class_gram":
                src = shift_class_grams_(o[key].clone(), o["class_sum"], o["count"], delta)
            elif key != "shift":
                src = moved.get(key, o[key])
            else:
                continue
            (t.narrow(_CLASS_DIM[key], 0, c) if key in _CLASS_DIM else t).add_(src)
        if self.keep_source_probs:
            self._probs += [t.to(dev) for t in probs]
            self._prob_labels += [t.to(dev) for t in labels]


def _gather_rows(t: torch.Tensor, group, world: int) -> torch.Tensor:
    """Every rank's rows of t (lengths may differ), concatenated in rank order."""
    import torch.distributed as dist

    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(k) for k in sizes]
    padded = torch.cat([t, t.new_zeros((max(sizes) - t.shape[0], *t.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:k] for part, k in zip(parts, sizes)])
