"""One interface for every way of changing the LSTM weights while reading.

`fast` holds the adapted weights with a leading stream dimension (B, ...); `theta0`
the static starting weights (...). Rules are pure: they return new dicts and never
write in place, so the same code serves meta-training (differentiable) and evaluation.
The one exception is evaluation's sparse update of an input-only embedding (LazyRows),
which writes the rows a chunk read back into the reader's own embedding.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

Params = dict[str, Tensor]
RuleState = dict[str, Tensor]


class Rule(nn.Module):
    name = "rule"
    adapts = True  # False: no inner gradient is needed at all
    # True: a weight coordinate whose gradient is zero changes in closed form (`decay_rows`), so in
    # evaluation an embedding read only by lookup is updated in the rows a chunk reads (LazyRows) and
    # `update` may be given such a weight as a block of rows (its `rows` argument)
    sparse_rows = False

    def init_state(self, fast: Params) -> RuleState:
        return {}

    def eager(self):
        """A context in which the update runs without torch.compile (rules that compile override it)."""
        return contextlib.nullcontext()

    def update(self, fast: Params, grads: Params, theta0: Params, state: RuleState, loss: Tensor,
               rows: dict[str, Tensor] | None = None) -> tuple[Params, RuleState, dict]:
        """loss (B,): the chunk's mean NLL per stream. Returns new weights, new state, stats.
        rows (only for rules with sparse_rows): {name: row indices (R,)} of the weights given as a
        block of their rows: fast[name], grads[name] (B, R, ...), theta0[name] (R, ...)."""
        raise NotImplementedError

    def decay_rows(self, name: str, w: Tensor, theta0: Tensor, rows: Tensor | None, n: Tensor) -> Tensor:
        """Rows `rows` (R,) of fast weight `name` (None: all rows), w (B, R, ...), after n (B, R) more
        updates with a zero gradient; theta0 (R, ...) the same rows of theta0. Default: unchanged."""
        return w

    def row_state_keys(self, name: str) -> tuple[str, ...]:
        """Keys of the rule state that hold a value per coordinate of fast weight `name` (its shape,
        B first): LazyRows gathers, brings up to date (`decay_state_rows`) and writes back their rows
        with the weight's. Default: none."""
        return ()

    def decay_state_rows(self, key: str, s: Tensor, n: Tensor) -> Tensor:
        """Rows (B, R, ...) of rule state `key` after n (B, R) more updates with a zero gradient."""
        return s

    def materialise(self, fast: Params, theta0: Params, state: RuleState) -> tuple[Params, RuleState]:
        """The fast weights with every update that LazyRows held back applied: call before reading a
        lazily updated weight whole (e.g. the weight drift). Evaluation only: writes in place."""
        return LazyRows.materialise(self, fast, theta0, state)


class StaticRule(Rule):
    name = "static"
    adapts = False

    def update(self, fast, grads, theta0, state, loss, rows=None):
        return fast, state, {}


class SGDRule(Rule):
    """Plain dynamic evaluation: one SGD step on each chunk's loss. A zero gradient changes nothing,
    so the sparse row update needs no bookkeeping."""
    name = "sgd"
    sparse_rows = True

    def __init__(self, lr: float):
        super().__init__()
        self.lr = lr

    def update(self, fast, grads, theta0, state, loss, rows=None):
        return {k: torch.add(w, grads[k], alpha=-self.lr) for k, w in fast.items()}, state, {}


class LazyRows:
    """Evaluation's sparse update of an embedding that is read only by lookup (not the softmax).

    In a chunk such an embedding gets a gradient only in the rows of the tokens the chunk reads;
    every other row gets a zero gradient, and a rule with `sparse_rows` changes it in closed form
    (`Rule.decay_rows`: not at all for sgd, a decay towards theta0 for dyneval). So the chunk step
    (`unroll._chunk_step`) gathers the rows the chunk reads (the union over streams, R of them)
    into a (B, R, E) block, brings them up to date, reads the chunk with the block and local token
    ids, lets the rule update the block like any other weight, and writes it back; the other rows
    wait, and the cost follows the tokens read, not the vocabulary. The result is the dense update's.

    Per-coordinate rule state (Adam's second moment, `Rule.row_state_keys`) goes the same way: its
    rows are gathered with the weight's, brought up to date (`Rule.decay_state_rows`) and written back.

    Bookkeeping (in the rule state, only for rules that decay, see `init_state`): `lazy.step` (B,),
    the updates each stream has made since it started, and `lazy.last.<name>` (B, V), the update
    count each row of each stream is up to date with; a row read (or materialised) after missing
    n = step - last updates gets them at once. Fresh state (an article reset) starts both at 0.
    """
    STEP = "lazy.step"
    NAMES = ("embed",)  # the weights that may be input-only (the model says whether they are)

    def __init__(self, rule: Rule, name: str, w: Tensor, theta0: Params, state: RuleState, inputs: Tensor):
        """w (B, V, E): the reader's fast weight `name`; inputs (B, T): the chunk's token ids."""
        self.name, self.w = name, w
        self.rows, self.inputs = torch.unique(inputs, return_inverse=True)  # (R,) rows read, (B, T) local ids
        rows0 = theta0[name][self.rows]  # (R, E)
        self.theta0 = {**theta0, name: rows0}
        block = w[:, self.rows]  # (B, R, E), a copy
        self.full_state = {k: state[k] for k in rule.row_state_keys(name)}  # (B, V, E) each, written back in place
        blocks = {k: s[:, self.rows] for k, s in self.full_state.items()}  # (B, R, E) each, copies
        last = state.get(self.last_key(name))
        if last is not None:
            n = state[self.STEP].unsqueeze(1) - last[:, self.rows]  # (B, R) updates these rows missed
            if bool(n.any()):
                block = rule.decay_rows(name, block, rows0, self.rows, n)
                blocks = {k: rule.decay_state_rows(k, s, n) for k, s in blocks.items()}
        self.block = block
        self.state = {**state, **blocks}  # the rule state the update sees: row blocks for the row state

    @staticmethod
    def last_key(name: str) -> str:
        return f"lazy.last.{name}"

    @classmethod
    def init_state(cls, fast: Params) -> RuleState:
        """Counters for the weights in `fast` that may be updated lazily (for a rule that decays)."""
        names = [k for k in cls.NAMES if k in fast]
        if not names:
            return {}
        w = fast[names[0]]
        state = {cls.STEP: torch.zeros(w.shape[0], dtype=torch.long, device=w.device)}
        state.update({cls.last_key(k): torch.zeros(fast[k].shape[:2], dtype=torch.long, device=w.device)
                      for k in names})
        return state

    def write_back(self, fast: Params, state: RuleState, active: Tensor) -> tuple[Params, RuleState]:
        """fast[name]: the updated block (B, R, E); active (B,): streams that read real tokens (the
        others' rows are only brought up to date). Returns the full weights and the new counters."""
        # In place, so that a chunk costs the rows it read, not the vocabulary: evaluation only (no
        # graph to keep), into the reader's own embedding (start_reader / reset_streams / materialise
        # made it; only this reader holds it), which the returned reader goes on holding.
        self.w.index_copy_(1, self.rows, fast[self.name].detach())
        fast = {**fast, self.name: self.w}
        for k, full in self.full_state.items():
            full.index_copy_(1, self.rows, state[k].detach())
        state = {**state, **self.full_state}
        key = self.last_key(self.name)
        if key in state:
            step = state[self.STEP] + active.long()  # (B,) padding rows make no update
            last = state[key].index_copy(1, self.rows, step.unsqueeze(1).expand(-1, len(self.rows)).contiguous())
            state = {**state, self.STEP: step, key: last}
        return fast, state

    @classmethod
    def materialise(cls, rule: Rule, fast: Params, theta0: Params, state: RuleState) -> tuple[Params, RuleState]:
        """Every row brought up to date, in place as write_back (evaluation only). Only rows written since
        their stream started can differ from theta0 (the others are theta0, which the decay keeps), so
        the cost follows the rows read, not the vocabulary."""
        for name in cls.NAMES:
            key = cls.last_key(name)
            if name not in fast or key not in state:
                continue
            step, last = state[cls.STEP].unsqueeze(1), state[key]  # (B, 1), (B, V)
            n = step - last
            rows = ((n > 0) & (last > 0)).any(0).nonzero().squeeze(1)
            if len(rows):
                w = fast[name]
                w.index_copy_(1, rows, rule.decay_rows(name, w[:, rows], theta0[name][rows], rows, n[:, rows]))
                for k in rule.row_state_keys(name):
                    state[k].index_copy_(1, rows, rule.decay_state_rows(k, state[k][:, rows], n[:, rows]))
                state = {**state, key: torch.where(last > 0, step, last)}  # rows never written stay at 0
        return fast, state
