"""``LongSequenceDataset``: synthetic long sequences whose answers need attention across the whole sequence.

The task is multi-query key-value recall. A sequence of ``seq_len`` tokens is filler with
``num_pairs`` key-value *pair tokens* scattered uniformly over it; at its very end come the queries:
each key once more, followed by its value. The model is scored on predicting the value after each
queried key::

    f f f (k3,v5) f f f f (k1,v2) f ... f (k7,v0) f f | k1 v2 k7 v0 k3 v5 ...
                                                        ^^ the token after k1 must be v2

Nothing near a query tells its answer: the answer sits wherever its pair landed, on whichever rank's
shard holds that position (about half the time another rank's under cp=2; see
:meth:`LongSequenceDataset.remote_fraction`). Keys and values are each distinct within a sequence
(the values are a random permutation), so a model that does not look up the queried key is at
chance, ``1 / num_values``, even if it knows which values the sequence contains
(:attr:`LongSequenceDataset.chance_accuracy`).

Why a pair is ONE token (id ``pair_start + key * V + value``): one attention layer can then retrieve
it, matching the query's key against the pair's; with the key and value as two adjacent tokens the
model must first grow an induction circuit (two composed layers), which takes far longer to learn
than a CPU demo can afford. The attention pattern that matters for context parallelism is the same:
a query reads one token anywhere in the sequence.

Every sample is a pure function of ``(seed, index)``: the same on every rank, in every run.

Token ids: ``0`` unused, keys ``[1, 1 + K)``, values ``[1 + K, 1 + K + V)``, pairs
``[1 + K + V, 1 + K + V + K * V)``, filler the last ``num_filler`` ids.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from cp_dtensor.layout import shard_positions
from cp_dtensor.loss import shift_labels

__all__ = ["LongSequenceDataset"]


class LongSequenceDataset(Dataset):
    """Deterministic multi-query key-value recall over long sequences.

    Example:
        >>> ds = LongSequenceDataset(seq_len=1024)
        >>> item = ds[0]
        >>> item["input_ids"].shape, item["labels"].shape
        (torch.Size([1024]), torch.Size([1024]))
        >>> ds.vocab_size, ds.chance_accuracy
        (82, 0.125)

    Args:
        seq_len: Tokens per sequence ``L``.
        num_samples: Length of the dataset (indices ``0 .. num_samples - 1``).
        num_pairs: Key-value pairs hidden in the context (``N``).
        num_queries: Keys queried at the end (distinct, among the pairs); default ``N``.
        num_keys: Key vocabulary ``K >= N``.
        num_values: Value vocabulary ``V >= N``.
        num_filler: Filler token ids.
        seed: Seed of the whole dataset.

    Raises:
        ValueError: The sizes are inconsistent (the message names the bad one and the bound).
    """

    def __init__(
        self,
        seq_len: int,
        *,
        num_samples: int = 1_000_000,
        num_pairs: int = 8,
        num_queries: int | None = None,
        num_keys: int = 8,
        num_values: int = 8,
        num_filler: int = 1,
        seed: int = 0,
    ) -> None:
        num_queries = num_pairs if num_queries is None else num_queries
        self.seq_len, self.num_samples, self.seed = seq_len, num_samples, seed
        self.num_pairs, self.num_queries = num_pairs, num_queries
        self.num_keys, self.num_values, self.num_filler = num_keys, num_values, num_filler
        for name in ("seq_len", "num_samples", "num_pairs", "num_queries", "num_keys", "num_values", "num_filler"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if num_queries > num_pairs:
            raise ValueError(f"num_queries={num_queries} must be <= num_pairs={num_pairs}.")
        if num_pairs > min(num_keys, num_values):
            raise ValueError(
                f"num_pairs={num_pairs} must be <= num_keys={num_keys} and <= num_values={num_values} "
                "(keys and values are distinct within a sequence)."
            )
        if num_pairs > self.context_len:
            raise ValueError(
                f"seq_len={seq_len} is too short for {num_pairs} pairs and {num_queries} queries: "
                f"need seq_len >= {num_pairs + 2 * num_queries}."
            )

    @property
    def key_start(self) -> int:
        """First key id (keys are ``[key_start, key_start + K)``)."""
        return 1

    @property
    def value_start(self) -> int:
        """First value id."""
        return 1 + self.num_keys

    @property
    def pair_start(self) -> int:
        """First pair id: the pair ``(key, value)`` is ``pair_start + key * V + value``."""
        return 1 + self.num_keys + self.num_values

    @property
    def filler_start(self) -> int:
        """First filler id."""
        return self.pair_start + self.num_keys * self.num_values

    @property
    def vocab_size(self) -> int:
        """Number of token ids: ``1 + K + V + K * V + num_filler``."""
        return self.filler_start + self.num_filler

    @property
    def context_len(self) -> int:
        """Tokens before the queries: ``seq_len - 2 * num_queries``."""
        return self.seq_len - 2 * self.num_queries

    @property
    def chance_accuracy(self) -> float:
        """Accuracy without looking the key up: ``1 / num_values`` (values are distinct per sequence)."""
        return 1.0 / self.num_values

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """One sequence.

        Returns:
            A dict of tensors:

            * ``input_ids`` ``(L,)`` long.
            * ``labels`` ``(L,)`` long: the value after each queried key, ``-100`` elsewhere (already
              shifted on the full sequence; partition it like ``input_ids``).
            * ``query_positions`` ``(Q,)``: positions of the queried keys (where labels are set).
            * ``source_positions`` ``(Q,)``: positions of their pair tokens in the context.
        """
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for a dataset of {self.num_samples} samples")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        k, v, n, q = self.num_keys, self.num_values, self.num_pairs, self.num_queries
        ids_L = torch.randint(self.filler_start, self.vocab_size, (self.seq_len,), generator=gen)
        keys_N = torch.randperm(k, generator=gen)[:n]  # distinct keys
        values_N = torch.randperm(v, generator=gen)[:n]  # distinct values: no guessing a common one
        pair_pos_N = torch.randperm(self.context_len, generator=gen)[:n]
        ids_L[pair_pos_N] = self.pair_start + keys_N * v + values_N
        asked_Q = torch.randperm(n, generator=gen)[:q]
        query_pos_Q = self.context_len + 2 * torch.arange(q)
        ids_L[query_pos_Q] = self.key_start + keys_N[asked_Q]
        ids_L[query_pos_Q + 1] = self.value_start + values_N[asked_Q]
        answer_mask_L = torch.zeros(self.seq_len, dtype=torch.bool)
        answer_mask_L[query_pos_Q + 1] = True
        labels_L = shift_labels(ids_L[None], answer_mask_L[None])[0]
        return {
            "input_ids": ids_L,
            "labels": labels_L,
            "query_positions": query_pos_Q,
            "source_positions": pair_pos_N[asked_Q],
        }

    def remote_answers(self, item: dict[str, torch.Tensor], cp_size: int, layout: str = "zigzag") -> torch.Tensor:
        """Where ``item``'s answers need another rank's shard.

        Args:
            item: A sample from this dataset.
            cp_size: Ranks the sequence is split over.
            layout: The layout it is split with.

        Returns:
            ``(L,)`` bool: True at each query position whose pair token lies on another cp rank.
        """
        owner_L = torch.empty(self.seq_len, dtype=torch.long)
        for rank in range(cp_size):
            owner_L[shard_positions(self.seq_len, cp_size, rank, layout)] = rank
        remote_L = torch.zeros(self.seq_len, dtype=torch.bool)
        queries, sources = item["query_positions"], item["source_positions"]
        remote_L[queries] = owner_L[queries] != owner_L[sources]
        return remote_L

    def remote_fraction(self, cp_size: int, layout: str = "zigzag", num_samples: int = 64) -> float:
        """Fraction of answers whose pair token lies on another cp rank's shard than the query.

        Args:
            cp_size: Ranks the sequence is split over.
            layout: The layout it is split with.
            num_samples: How many sequences to average over (the first ones).

        Returns:
            A fraction in ``[0, 1]``; 0 for ``cp_size == 1``.
        """
        count = min(num_samples, self.num_samples)
        remote = sum(int(self.remote_answers(self[i], cp_size, layout).sum()) for i in range(count))
        return remote / (count * self.num_queries)
