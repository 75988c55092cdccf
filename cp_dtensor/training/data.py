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

Packing (``num_documents=D > 1``): the sequence is cut into ``D`` documents of random lengths (at
least :attr:`LongSequenceDataset.min_document_len` tokens each), every one a whole recall task of its
own, with its pairs, then its queries at its end. Keys recur across documents with other values, so a
query is only answerable inside its own document: train with the item's ``document_ids`` as the
attention's document mask (see docs/masks.md); plain causal attention over the packed
sequence also sees the other documents' pairs, which contradict the right one.

Every sample is a pure function of ``(seed, index)``: the same on every rank, in every run.

Token ids: ``0`` unused, keys ``[1, 1 + K)``, values ``[1 + K, 1 + K + V)``, pairs
``[1 + K + V, 1 + K + V + K * V)``, filler the last ``num_filler`` ids.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from cp_dtensor.arguments import check_positive_int
from cp_dtensor.nn.loss import shift_labels
from cp_dtensor.positions.layout import shard_positions

__all__ = ["LongSequenceDataset"]


class LongSequenceDataset(Dataset):
    """Deterministic multi-query key-value recall over long sequences.

    Examples:
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
        num_documents: Documents packed into each sequence (``D``); 1 = no packing. Their lengths are
            random, each at least :attr:`min_document_len`.
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
        num_documents: int = 1,
        seed: int = 0,
    ) -> None:
        num_queries = num_pairs if num_queries is None else num_queries
        self.seq_len, self.num_samples, self.seed = seq_len, num_samples, seed
        self.num_pairs, self.num_queries = num_pairs, num_queries
        self.num_keys, self.num_values, self.num_filler = num_keys, num_values, num_filler
        self.num_documents = num_documents
        names = (
            "seq_len",
            "num_samples",
            "num_pairs",
            "num_queries",
            "num_keys",
            "num_values",
            "num_filler",
            "num_documents",
        )
        for name in names:
            value = getattr(self, name)
            check_positive_int(name, value)
        if num_queries > num_pairs:
            raise ValueError(f"num_queries={num_queries} must be <= num_pairs={num_pairs}.")
        if num_pairs > min(num_keys, num_values):
            raise ValueError(
                f"num_pairs={num_pairs} must be <= num_keys={num_keys} and <= num_values={num_values} "
                "(keys and values are distinct within a sequence)."
            )
        if seq_len < num_documents * self.min_document_len:
            raise ValueError(
                f"seq_len={seq_len} is too short for {num_documents} document(s) of {num_pairs} pairs and "
                f"{num_queries} queries: need seq_len >= {num_documents * self.min_document_len} "
                f"(num_documents * min_document_len = {num_documents} * {self.min_document_len})."
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
        """Tokens before the queries of a one-document sequence: ``seq_len - 2 * num_queries``."""
        return self.seq_len - 2 * self.num_queries

    @property
    def min_document_len(self) -> int:
        """Shortest document: its pairs and its queries, ``num_pairs + 2 * num_queries``."""
        return self.num_pairs + 2 * self.num_queries

    @property
    def answers_per_sequence(self) -> int:
        """Supervised tokens per sequence: ``num_documents * num_queries``."""
        return self.num_documents * self.num_queries

    @property
    def chance_accuracy(self) -> float:
        """Accuracy without looking the key up: ``1 / num_values`` (values are distinct per sequence)."""
        return 1.0 / self.num_values

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """One sequence.

        Returns:
            A dict of tensors (``A = num_documents * num_queries`` answers):

            * ``input_ids`` ``(L,)`` long.
            * ``labels`` ``(L,)`` long: the value after each queried key, ``-100`` elsewhere (already
                shifted on the full sequence, never across a document boundary; partition it like
                ``input_ids``).
            * ``document_ids`` ``(L,)`` long: the document of each token, ``0 .. D - 1`` in order (all
                0 without packing); the attention's ``document_ids=`` for packed training.
            * ``query_positions`` ``(A,)``: positions of the queried keys (where labels are set).
            * ``source_positions`` ``(A,)``: positions of their pair tokens, in the same document.
        """
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for a dataset of {self.num_samples} samples")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        lengths = [self.seq_len] if self.num_documents == 1 else self._document_lengths(gen)
        docs = []
        start = 0
        for length in lengths:
            docs.append(self._document(gen, length, start))
            start += length
        ids_L = torch.cat([d[0] for d in docs])
        answer_mask_L = torch.cat([d[1] for d in docs])
        document_ids_L = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(lengths)])
        return {
            "input_ids": ids_L,
            "labels": shift_labels(ids_L[None], answer_mask_L[None], document_ids=document_ids_L[None])[0],
            "document_ids": document_ids_L,
            "query_positions": torch.cat([d[2] for d in docs]),
            "source_positions": torch.cat([d[3] for d in docs]),
        }

    def _document_lengths(self, gen: torch.Generator) -> list[int]:
        """``D`` random lengths summing to ``seq_len``, each at least :attr:`min_document_len`."""
        spare = self.seq_len - self.num_documents * self.min_document_len
        cuts = torch.randint(0, spare + 1, (self.num_documents - 1,), generator=gen).sort().values.tolist()
        bounds = [0, *cuts, spare]
        return [self.min_document_len + b - a for a, b in zip(bounds[:-1], bounds[1:])]

    def _document(self, gen: torch.Generator, length: int, start: int):
        """One recall task of ``length`` tokens starting at global position ``start``.

        Returns:
            ``(ids (length,), answer_mask (length,), query_positions (Q,), source_positions (Q,))``,
            positions global.
        """
        k, v, n, q = self.num_keys, self.num_values, self.num_pairs, self.num_queries
        context_len = length - 2 * q
        ids = torch.randint(self.filler_start, self.vocab_size, (length,), generator=gen)
        keys_N = torch.randperm(k, generator=gen)[:n]  # distinct keys
        values_N = torch.randperm(v, generator=gen)[:n]  # distinct values: no guessing a common one
        pair_pos_N = torch.randperm(context_len, generator=gen)[:n]
        ids[pair_pos_N] = self.pair_start + keys_N * v + values_N
        asked_Q = torch.randperm(n, generator=gen)[:q]
        query_pos_Q = context_len + 2 * torch.arange(q)
        ids[query_pos_Q] = self.key_start + keys_N[asked_Q]
        ids[query_pos_Q + 1] = self.value_start + values_N[asked_Q]
        answer_mask = torch.zeros(length, dtype=torch.bool)
        answer_mask[query_pos_Q + 1] = True
        return ids, answer_mask, start + query_pos_Q, start + pair_pos_N[asked_Q]

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
        return remote / (count * self.answers_per_sequence)
