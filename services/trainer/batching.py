"""From Atropos scored groups to packed micro-batches.

Conventions (Atropos): per-token lists (masks, advantages, inference_logprobs,
ref_logprobs) are aligned with `tokens`; `masks[t] == -100` marks a prompt token. Token t
is predicted from position t - 1, so the targets of a sequence are its tokens t >= 1
whose mask is not -100.

Three layouts of a micro-batch (`BatchConfig.layout`). The first two have no attention
mask and position ids restarting at 0 for each sequence, from which Transformers builds
a block-diagonal causal mask (`tests/unit/test_trainer_grpo.py` checks that packed
log-probs equal unpacked ones; `tests/unit/test_trainer_layout.py` and
`tests/unit/test_trainer_shared_prefix.py` that the others give the same log-probs,
loss and gradients):

- "packed": sequences laid end to end in one row of at most `micro_batch_tokens` tokens
  (first fit, longest first): no padding at all, but attention over the whole row, so
  its cost grows with the square of the row (and the mask is a dense L x L one).
- "rows": rows as wide as the micro-batch's longest sequence, the shorter sequences
  first-fit into them (longest first), padded at their end, as many rows as fit in
  `micro_batch_tokens` (rows x width). Attention stays within a row: linear in the
  batch. Where every row holds one sequence (equal lengths, the usual GRPO batch) the
  mask is plain causal and attention takes SDPA's fused path. Padding sits after each
  row's last token, where causal attention never lets a real token see it.
- "shared_prefix": sequences with the same prompt (the same tokens before their first
  target, as GRPO's samples of one prompt have) become one tree laid out in a row: the
  prompt once, then each sequence's rest, positions continuing after the prompt, with
  a 4D mask (`MicroBatch.attention_mask`) in which every rest sees the prompt and its
  own earlier tokens only. The prompt is computed once for all of its sequences (its
  gradient is the sum over them, as autograd sums over the columns that read it); the
  first target of each sequence is predicted from the prompt's last column. A sequence
  whose prompt no other has is a tree of one (a plain row). Trees are first-fit into
  rows like "rows" (a tree wider than `micro_batch_tokens` is cut into several, each
  with the prompt). The prompt is found from the data, not from the group: a group
  whose members have different prompts trains as "rows" does, and equal prompts of
  different groups share.

The forward pass asks for logits at target columns only (`logits_to_keep`), which keeps
the vocabulary-sized tensors as small as the completions.

What a trainer cannot use is judged per sequence, never by failing the batch
(`Unusable`): a sequence with no tokens, a token id outside the model's vocabulary or
a score that is not finite is dropped; an optional per-token field (advantages,
inference_logprobs, ref_logprobs) whose length differs from the tokens' or that holds
a non-finite number is ignored for that sequence (group advantages, on-policy
logprobs, no reference term instead), as `run-api` lets such fields through. Both are
counted per reason in `TrainBatch.dropped` / `TrainBatch.fallbacks` (the step line's
`dropped/*` and `fallback/*`) and logged once per reason. Only masks that do not line
up with their tokens fail the batch (ValueError): the gateway never lets them through.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from clotho.v1 import scored_data_pb2
from services.trainer.losses import RunningMoments, group_advantages, normalize_advantages, token_weights

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class BatchConfig:
    """How a batch becomes training data."""

    normalize_std: bool = True
    std_eps: float = 1e-6
    adv_norm: str = "none"
    adv_clip: float = 0.0
    aggregation: str = "token"
    max_token_len: int | None = None
    micro_batch_tokens: int = 8192
    # "packed", "rows" or "shared_prefix" (module docstring).
    layout: str = "packed"
    # Drop sequences generated more than this many versions ago (None keeps all).
    max_staleness: int | None = None
    # The model's vocabulary size: a sequence with a token id outside it is dropped
    # (None: only negative ids are).
    vocab_size: int | None = None


@dataclass
class TrainSequence:
    """One sequence's training data; per-target tensors are in target order."""

    tokens: list[int]
    targets: list[int]  # token indices t (>= 1) that are trained on
    advantages: torch.Tensor  # [n_targets] float32
    old_logprobs: torch.Tensor  # [n_targets] float32 (NaN where not sent)
    ref_logprobs: torch.Tensor  # [n_targets] float32 (NaN where not sent)
    weight: float = 0.0  # per-token aggregation weight
    score: float = 0.0
    env_id: int | None = None
    staleness: int | None = None


@dataclass
class TrainBatch:
    """A batch ready to split across ranks and pack."""

    sequences: list[TrainSequence]
    scores: list[float]  # every sequence's score, stale ones included
    env_scores: dict[int, list[float]]
    stale_dropped: int = 0
    staleness: list[int] = field(default_factory=list)
    # Sequences dropped as unusable, per reason (Unusable), and optional fields
    # ignored for a sequence, per field and reason.
    dropped: dict[str, int] = field(default_factory=dict)
    fallbacks: dict[str, int] = field(default_factory=dict)

    @property
    def num_targets(self) -> int:
        return sum(len(s.targets) for s in self.sequences)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.sequences)


_logged: set[str] = set()


def _log_once(reason: str, message: str, *args: object) -> None:
    if reason not in _logged:
        _logged.add(reason)
        log.warning(message + " (logged once; counted in the step line)", *args)


def _unusable(seq: scored_data_pb2.ScoredSequence, vocab_size: int | None) -> str | None:
    """Why a sequence cannot be trained on at all, or None."""
    if not seq.tokens:
        return "empty"
    if not math.isfinite(seq.score):
        return "non_finite_score"
    if min(seq.tokens) < 0 or (vocab_size is not None and max(seq.tokens) >= vocab_size):
        return "token_out_of_vocab"
    return None


def _per_token(
    seq: scored_data_pb2.ScoredSequence, what: str, index: int, fallbacks: dict[str, int]
) -> list[float] | None:
    """The field's values when usable for the sequence, else None (counted when the
    field was sent: filled in, or named in present_fields but missing for this one)."""
    values: Sequence[float] = getattr(seq, what)
    n = len(seq.tokens)
    if not len(values) and what not in seq.present_fields:
        return None
    if len(values) != n:
        reason = f"{what}_length"
        _log_once(reason, "sequence %d sent %d %s for %d tokens; ignoring them", index, len(values), what, n)
    elif not all(map(math.isfinite, values)):
        reason = f"{what}_non_finite"
        _log_once(reason, "sequence %d sent non-finite %s; ignoring them", index, what)
    else:
        return list(values)
    fallbacks[reason] = fallbacks.get(reason, 0) + 1
    return None


def prepare(
    groups: Sequence[scored_data_pb2.ScoredGroup],
    config: BatchConfig = BatchConfig(),
    *,
    policy_version: int = 0,
    moments: RunningMoments | None = None,
) -> TrainBatch:
    """Advantages, sampling/reference log-probs and aggregation weights of every
    sequence of the batch, stale and unusable sequences dropped (module docstring).

    Advantages are the group-normalised scores (over the group's usable members, stale
    ones included), replaced per token by the environment's own `advantages` where it
    sent usable ones; then normalised over the batch's targets and clipped as
    configured. Raises ValueError when a sequence's masks do not line up with its
    tokens or no usable sequence is left.
    """
    seqs: list[TrainSequence] = []
    scores: list[float] = []
    env_scores: dict[int, list[float]] = {}
    staleness_seen: list[int] = []
    dropped = 0
    unusable: dict[str, int] = {}
    fallbacks: dict[str, int] = {}
    first_reason = ""
    index = 0
    limit = config.max_token_len
    for group in groups:
        usable = []
        for seq in group.sequences:
            i, index = index, index + 1
            n_all = len(seq.tokens)
            if len(seq.masks) != n_all:
                raise ValueError(f"sequence {i}: {len(seq.masks)} masks for {n_all} tokens")
            reason = _unusable(seq, config.vocab_size)
            if reason is None:
                usable.append((i, seq))
                continue
            unusable[reason] = unusable.get(reason, 0) + 1
            first_reason = first_reason or f"sequence {i}: {reason}"
            _log_once(reason, "sequence %d dropped: %s", i, reason)
        group_adv = group_advantages([s.score for _, s in usable], config.normalize_std, config.std_eps)
        env = group.env_id if group.HasField("env_id") else None
        for (i, seq), adv in zip(usable, group_adv):
            n_all = len(seq.tokens)
            scores.append(seq.score)
            if env is not None:
                env_scores.setdefault(env, []).append(seq.score)
            stale = None
            if seq.HasField("policy_version"):
                stale = max(policy_version - int(seq.policy_version), 0)
                staleness_seen.append(stale)
            if stale is not None and config.max_staleness is not None and stale > config.max_staleness:
                dropped += 1
                continue
            n = n_all if limit is None else min(n_all, limit)
            targets = [t for t in range(1, n) if seq.masks[t] != IGNORE_INDEX]
            token_adv = _per_token(seq, "advantages", i, fallbacks)
            old = _per_token(seq, "inference_logprobs", i, fallbacks)
            ref = _per_token(seq, "ref_logprobs", i, fallbacks)
            nan = float("nan")
            seqs.append(
                TrainSequence(
                    tokens=list(seq.tokens[:n]),
                    targets=targets,
                    advantages=torch.tensor(
                        [token_adv[t] for t in targets] if token_adv is not None else [adv] * len(targets),
                        dtype=torch.float32,
                    ),
                    old_logprobs=torch.tensor(
                        [old[t] if old is not None else nan for t in targets], dtype=torch.float32
                    ),
                    ref_logprobs=torch.tensor(
                        [ref[t] if ref is not None else nan for t in targets], dtype=torch.float32
                    ),
                    score=seq.score,
                    env_id=env,
                    staleness=stale,
                )
            )
    if not scores:
        raise ValueError(f"batch has no usable sequences{' (' + first_reason + ')' if first_reason else ''}")
    if config.adv_norm != "none" or config.adv_clip > 0:
        flat = torch.cat([s.advantages for s in seqs]) if seqs else torch.zeros(0)
        normed = normalize_advantages(flat, config.adv_norm, moments, config.adv_clip, config.std_eps)
        offset = 0
        for s in seqs:
            s.advantages = normed[offset : offset + len(s.targets)]
            offset += len(s.targets)
    weights = token_weights([len(s.targets) for s in seqs], config.aggregation, config.max_token_len)
    for s, w in zip(seqs, weights):
        s.weight = w
    return TrainBatch(seqs, scores, env_scores, dropped, staleness_seen, unusable, fallbacks)


def split(sequences: Sequence[TrainSequence], ranks: int, layout: str = "rows") -> list[list[int]]:
    """Indices of the sequences each rank trains on, balanced by token count (longest
    first onto the least loaded rank). Deterministic: every rank computes the same.
    Under "shared_prefix" the units are the sequences sharing a prompt (a tree, counted
    by its tokens with the prompt once), cut only where one would outweigh a rank's
    fair share, so that a group's samples share their prompt on one rank."""
    units: list[tuple[int, list[int]]]
    if layout == "shared_prefix" and ranks > 1:
        loose = [i for i in range(len(sequences)) if not sequences[i].targets]
        trees = _trees(sequences, [i for i in range(len(sequences)) if sequences[i].targets])
        total = sum(_tree_tokens(sequences, t) for t in trees) + sum(len(sequences[i].tokens) for i in loose)
        fair = -(-total // ranks)
        units = [(len(sequences[i].tokens), [i]) for i in loose]
        units += [(_tree_tokens(sequences, t), t) for tree in trees for t in _deal(sequences, tree, fair)]
    else:
        units = [(len(sequences[i].tokens), [i]) for i in range(len(sequences))]
    loads = [0] * ranks
    out: list[list[int]] = [[] for _ in range(ranks)]
    for cost, members in sorted(units, key=lambda u: (-u[0], u[1][0])):
        r = min(range(ranks), key=lambda r: (loads[r], r))
        out[r].extend(members)
        loads[r] += cost
    for ids in out:
        ids.sort()
    return out


def _prompt(s: TrainSequence) -> int:
    """Tokens before the sequence's first target (its prompt, for sharing)."""
    return s.targets[0]


def _trees(sequences: Sequence[TrainSequence], indices: Sequence[int]) -> list[list[int]]:
    """The given sequences (with targets) grouped by prompt (the same tokens before
    their first target), in order of first appearance; a prompt of one is a tree of one."""
    trees: dict[tuple[int, ...], list[int]] = {}
    for i in indices:
        s = sequences[i]
        trees.setdefault(tuple(s.tokens[: _prompt(s)]), []).append(i)
    return list(trees.values())


def _tree_tokens(sequences: Sequence[TrainSequence], tree: Sequence[int]) -> int:
    """Tokens of a tree laid out: its prompt once, then every member's rest."""
    prompt = _prompt(sequences[tree[0]])
    return prompt + sum(len(sequences[i].tokens) - prompt for i in tree)


def _deal(sequences: Sequence[TrainSequence], tree: Sequence[int], fair: int) -> list[list[int]]:
    """A tree as the fewest pieces that its tokens allow at `fair` tokens each, every
    piece with the prompt: members longest first onto the lightest piece."""
    count = min(len(tree), -(-_tree_tokens(sequences, tree) // fair))
    pieces: list[list[int]] = [[] for _ in range(count)]
    loads = [0] * count
    for i in sorted(tree, key=lambda i: (-len(sequences[i].tokens), i)):
        k = min(range(count), key=lambda k: (loads[k], k))
        pieces[k].append(i)
        loads[k] += len(sequences[i].tokens)
    return [sorted(piece) for piece in pieces]


def _cut(sequences: Sequence[TrainSequence], tree: Sequence[int], capacity: int) -> list[list[int]]:
    """A tree as trees of at most `capacity` tokens each (one member at least), longest
    members first; every piece has the prompt."""
    pieces: list[list[int]] = []
    for i in sorted(tree, key=lambda i: (-len(sequences[i].tokens), i)):
        if pieces and _tree_tokens(sequences, pieces[-1] + [i]) <= capacity:
            pieces[-1].append(i)
        else:
            pieces.append([i])
    return pieces


@dataclass
class MicroBatch:
    """One forward pass: [R, L] inputs and one entry per target in them."""

    input_ids: torch.Tensor  # [R, L] long
    position_ids: torch.Tensor  # [R, L] long, restarting at 0 per sequence
    logit_columns: torch.Tensor  # [C] long: the columns whose logits are computed
    logit_index: torch.Tensor  # [n] long: the logits (in [R * C]) that predict each target
    labels: torch.Tensor  # [n] long: the target token ids
    advantages: torch.Tensor  # [n]
    old_logprobs: torch.Tensor  # [n], NaN where not sent
    ref_logprobs: torch.Tensor  # [n], NaN where not sent
    weights: torch.Tensor  # [n] aggregation weight of each target
    seq_index: torch.Tensor  # [n] which sequence (of the TrainBatch) each target is in
    real_tokens: int
    # [R, 1, L, L] bool, True where a column may attend to another ("shared_prefix" rows
    # that share a prompt); None: the causal mask Transformers builds from position_ids.
    attention_mask: torch.Tensor | None = None

    @property
    def num_targets(self) -> int:
        return int(self.labels.numel())

    @property
    def length(self) -> int:
        """Tokens processed (padding included)."""
        return int(self.input_ids.numel())

    def to(self, device: torch.device | str) -> MicroBatch:
        moved: dict[str, Any] = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return MicroBatch(**moved)


LAYOUTS = ("packed", "rows", "shared_prefix")


def pack(sequences: Sequence[TrainSequence], indices: Sequence[int], budget: int) -> list[MicroBatch]:
    """Pack the given sequences into rows of at most `budget` tokens (a longer sequence
    gets a row of its own), first fit by decreasing length, one row per micro-batch.
    Sequences without targets are left out: they contribute nothing to the loss."""
    return [_micro_batch(sequences, [row]) for row in plan_rows(sequences, indices, budget)]


def micro_batches(
    sequences: Sequence[TrainSequence], indices: Sequence[int], budget: int, layout: str = "packed"
) -> list[MicroBatch]:
    """The given sequences as micro-batches of `layout` (module docstring)."""
    share = layout == "shared_prefix"
    return [_micro_batch(sequences, rows, share) for rows in plan(sequences, indices, budget, layout)]


def plan(sequences: Sequence[TrainSequence], indices: Sequence[int], budget: int, layout: str) -> list[list[list[int]]]:
    """Which sequences go in which row of which micro-batch."""
    if layout == "packed":
        return [[row] for row in plan_rows(sequences, indices, budget)]
    if layout == "rows":
        live = _live_by_length(sequences, indices)
        return _plan_padded_rows([(len(sequences[i].tokens), [i]) for i in live], budget)
    if layout == "shared_prefix":
        trees = _trees(sequences, [i for i in indices if sequences[i].targets])
        units = [(_tree_tokens(sequences, t), t) for tree in trees for t in _cut(sequences, tree, budget)]
        return _plan_padded_rows(sorted(units, key=lambda u: (-u[0], u[1][0])), budget)
    raise ValueError(f"unknown batch layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def _live_by_length(sequences: Sequence[TrainSequence], indices: Sequence[int]) -> list[int]:
    return sorted((i for i in indices if sequences[i].targets), key=lambda i: (-len(sequences[i].tokens), i))


def plan_rows(sequences: Sequence[TrainSequence], indices: Sequence[int], budget: int) -> list[list[int]]:
    """Which sequences go in which packed row (see `pack`)."""
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in _live_by_length(sequences, indices):
        n = len(sequences[i].tokens)
        if not _first_fit(rows, fill, [i], n, budget):
            rows.append([i])
            fill.append(n)
    return rows


def _first_fit(rows: list[list[int]], fill: list[int], members: list[int], n: int, capacity: int) -> bool:
    """Put `members` (n tokens) in the first row with room for them (row r holds fill[r]
    of `capacity` tokens); False where none has."""
    for r, used in enumerate(fill):
        if used + n <= capacity:
            rows[r].extend(members)
            fill[r] += n
            return True
    return False


def _plan_padded_rows(units: Sequence[tuple[int, list[int]]], budget: int) -> list[list[list[int]]]:
    """Micro-batches of rows as wide as their widest unit (tokens, sequences: a sequence,
    or a tree of them), longest first; the first left sets the width, shorter units
    first fit into the rows' free ends, rows added while rows x width stays within
    `budget` (one row at least)."""
    left = list(units)
    out: list[list[list[int]]] = []
    while left:
        width = left[0][0]
        rows: list[list[int]] = []
        fill: list[int] = []
        rest: list[tuple[int, list[int]]] = []
        for n, members in left:
            if not _first_fit(rows, fill, members, n, width):
                if not rows or (len(rows) + 1) * width <= budget:
                    rows.append(list(members))
                    fill.append(n)
                else:
                    rest.append((n, members))
        out.append(rows)
        left = rest
    return out


def _micro_batch(sequences: Sequence[TrainSequence], rows: Sequence[Sequence[int]], share: bool = False) -> MicroBatch:
    """Rows of sequences laid end to end, padded at their end to the longest row. With
    `share`, the sequences of a row that have the same prompt are laid out as a tree
    (module docstring) under a 4D mask; where no row has two such sequences, the
    micro-batch is the same as without `share`."""
    laid = [_trees(sequences, row) if share else [[i] for i in row] for row in rows]
    tree_mask = any(len(tree) > 1 for row in laid for tree in row)
    ids: list[list[int]] = []
    pos: list[list[int]] = []
    tree_of: list[list[int]] = []  # per column: tree number in the row (-1 padding)
    branch_of: list[list[int]] = []  # per column: member of the tree (-1 its prompt)
    where: list[tuple[int, int]] = []  # (row, column) of each target's logits
    labels: list[int] = []
    seq_index: list[int] = []
    weights: list[float] = []
    order: list[int] = []
    real = 0
    for r, row in enumerate(laid):
        row_ids: list[int] = []
        row_pos: list[int] = []
        row_tree: list[int] = []
        row_branch: list[int] = []
        for k, tree in enumerate(row):
            # A tree of one is the sequence laid out whole (its "prompt" is empty).
            prompt = _prompt(sequences[tree[0]]) if len(tree) > 1 else 0
            head = len(row_ids)
            row_ids.extend(sequences[tree[0]].tokens[:prompt])
            row_pos.extend(range(prompt))
            row_tree.extend([k] * prompt)
            row_branch.extend([-1] * prompt)
            for b, i in enumerate(tree):
                s = sequences[i]
                # Token t is predicted from token t - 1's column: in the prompt, or in
                # the member's own rest (laid out from `offset` on, at positions >= prompt).
                offset = len(row_ids) - prompt
                row_ids.extend(s.tokens[prompt:])
                row_pos.extend(range(prompt, len(s.tokens)))
                row_tree.extend([k] * (len(s.tokens) - prompt))
                row_branch.extend([b] * (len(s.tokens) - prompt))
                where.extend((r, head + t - 1 if t - 1 < prompt else offset + t - 1) for t in s.targets)
                labels.extend(s.tokens[t] for t in s.targets)
                seq_index.extend([i] * len(s.targets))
                weights.extend([s.weight] * len(s.targets))
                order.append(i)
        real += len(row_ids)
        ids.append(row_ids)
        pos.append(row_pos)
        tree_of.append(row_tree)
        branch_of.append(row_branch)
    width = max(len(row) for row in ids)
    for row_ids, row_pos, row_tree, row_branch in zip(ids, pos, tree_of, branch_of):
        pad = width - len(row_ids)
        # Padding continues the row's last positions: no new sequence starts in it.
        row_pos.extend(range(row_pos[-1] + 1, row_pos[-1] + 1 + pad))
        row_ids.extend([row_ids[-1]] * pad)
        row_tree.extend([-1] * pad)
        row_branch.extend([-1] * pad)
    columns = sorted({c for _, c in where})
    slot = {c: k for k, c in enumerate(columns)}
    mask = None
    if tree_mask:
        tree_ids = torch.tensor(tree_of, dtype=torch.long)
        branch_ids = torch.tensor(branch_of, dtype=torch.long)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same_tree = tree_ids[:, :, None] == tree_ids[:, None, :]
        # Column q sees column k <= q of its own tree: the prompt, or its own branch.
        visible = (branch_ids[:, None, :] == -1) | (branch_ids[:, :, None] == branch_ids[:, None, :])
        mask = (causal & same_tree & visible)[:, None]
    return MicroBatch(
        input_ids=torch.tensor(ids, dtype=torch.long),
        position_ids=torch.tensor(pos, dtype=torch.long),
        logit_columns=torch.tensor(columns, dtype=torch.long),
        logit_index=torch.tensor([r * len(columns) + slot[c] for r, c in where], dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        advantages=torch.cat([sequences[i].advantages for i in order]),
        old_logprobs=torch.cat([sequences[i].old_logprobs for i in order]),
        ref_logprobs=torch.cat([sequences[i].ref_logprobs for i in order]),
        weights=torch.tensor(weights, dtype=torch.float32),
        seq_index=torch.tensor(seq_index, dtype=torch.long),
        real_tokens=real,
        attention_mask=mask,
    )


def dummy_micro_batch(token_id: int = 0) -> MicroBatch:
    """A two-token row with one zero-weight target: a rank with nothing (left) to train
    on runs it so that its collectives (gradient all-reduce, FSDP gathers) match the
    other ranks'."""
    return MicroBatch(
        input_ids=torch.tensor([[token_id, token_id]], dtype=torch.long),
        position_ids=torch.tensor([[0, 1]], dtype=torch.long),
        logit_columns=torch.tensor([0], dtype=torch.long),
        logit_index=torch.tensor([0], dtype=torch.long),
        labels=torch.tensor([token_id], dtype=torch.long),
        advantages=torch.zeros(1),
        old_logprobs=torch.full((1,), math.nan),
        ref_logprobs=torch.full((1,), math.nan),
        weights=torch.zeros(1),
        seq_index=torch.full((1,), -1, dtype=torch.long),
        real_tokens=0,
    )
