"""Word-crop datasets for CTC training: label checks up front, EasyOCR preprocessing per sample.

Example:
    >>> ds = CropDataset(LmdbDataset("data/prepared/train"), Charset.named("korean_g2"))  # doctest: +SKIP
    >>> ds.dropped                                                                         # doctest: +SKIP
    {'too_long': 3}
"""

from __future__ import annotations

import bisect
import hashlib
import random
import unicodedata
from array import array
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from training.augment import augment_crop, sample_rng
from training.charset import Charset
from training.data.lmdb_store import LmdbDataset
from training.data.set_index import SampleRows, StaleIndex
from training.data.transforms import collate_crops, pad_width, prepare_crop
from training.model import output_length


@dataclass
class CropBatch:
    """A padded batch: images (B, 1, H, W), concatenated targets and their lengths, raw labels."""

    images: torch.Tensor
    targets: torch.Tensor
    target_lengths: torch.Tensor
    labels: list[str]


class CropDataset(Dataset):
    """Samples of an LMDB set the model can learn; the rest are dropped and counted by reason.

    Labels are NFC-normalised as they are read (an LMDB set made by another tool, e.g. on macOS, may
    hold decomposed NFD jamo, which no charset class matches). A label is dropped when a character
    is outside the charset, or when CTC cannot align it: it
    needs at least one time step per character plus one between repeated characters, and the model
    emits ``width / 4 - 1`` steps for a crop padded to ``width`` (EasyOCR's padding). Crops wider than
    ``max_width`` after resizing are dropped to bound memory. With ``batch_max_length`` > 0, labels
    longer than that many characters are dropped too (``over_batch_max_length``, EasyOCR's
    ``batch_max_length``); 0 keeps every length the model can align.

    Items are fetched by index, or by ``(index, step, slot)`` keys from a tagged
    :class:`BucketBatchSampler`: then the crop is augmented with strength ``augment`` by a generator
    seeded from (seed, step, slot), the same in any worker and after a resume.

    ``fingerprint`` digests every sample's label, image size and image bytes in order: a resumed run
    checks it, so a set relabelled or re-rendered with the same count is not mistaken for the one a
    state trained on. The sizes and the fingerprint come from the set's index when one holds for the
    set as it is (``from_index``: only the labels are read), else from every sample, which writes the
    index (:mod:`training.data.set_index`).
    """

    def __init__(self, source: LmdbDataset, charset: Charset, imgH: int = 64, max_width: int = 1024,
                 batch_max_length: int = 0, augment: float = 0.0, seed: int = 0) -> None:
        self.source, self.charset, self.imgH = source, charset, imgH
        self.augment, self.seed = augment, seed
        rows = SampleRows(source)  # the set's index (training.data.set_index) when it holds, else every sample
        try:
            self._keep(rows, max_width, batch_max_length)
        except StaleIndex:
            rows = SampleRows(source, use_index=False)
            self._keep(rows, max_width, batch_max_length)
        self.fingerprint = rows.fingerprint
        self.from_index = rows.from_index  # read without the images (docs/training.md)

    def _keep(self, rows: SampleRows, max_width: int, batch_max_length: int) -> None:
        """Take each sample of ``rows`` the model can learn; count the rest in ``dropped`` by reason."""
        charset, imgH = self.charset, self.imgH
        self.dropped: Counter[str] = Counter()
        # flat machine-integer arrays, not lists of int objects: 12 bytes a kept sample instead of about 46
        # (4.5M crops: 54 MB, not 210), and reading one never writes to it (a list item's reference count
        # does), so DataLoader workers forked from this process keep sharing its pages instead of copying them
        self.indices = array("q")  # the kept samples' indices in ``source``
        self.widths = array("i")   # EasyOCR pad width of each kept sample, for bucketing
        self.longest_label = 0       # characters in the longest kept label: the batch_max_length this set needs
        for i, (label, h, w) in enumerate(rows):
            label = unicodedata.normalize("NFC", label)  # a set another tool wrote may hold NFD jamo
            if not label or charset.missing(label):
                self.dropped["out_of_charset" if label else "empty_label"] += 1
                continue
            if batch_max_length > 0 and len(label) > batch_max_length:
                self.dropped["over_batch_max_length"] += 1
                continue
            width = pad_width(w, h, imgH)
            if width > max_width:
                self.dropped["too_wide"] += 1
                continue
            repeats = sum(1 for a, b in zip(label, label[1:]) if a == b)
            if len(label) + repeats > output_length(width):
                self.dropped["too_long"] += 1
                continue
            self.indices.append(i)
            self.widths.append(width)
            self.longest_label = max(self.longest_label, len(label))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int, int]):
        index, step, slot = key if isinstance(key, tuple) else (key, 0, 0)
        image, label = self.source[self.indices[index]]
        label = unicodedata.normalize("NFC", label)
        if self.augment > 0 and isinstance(key, tuple):
            image = augment_crop(image, self.augment, sample_rng(self.seed, step, slot))
        return prepare_crop(image, self.imgH), label

    def collate(self, items) -> CropBatch:
        """DataLoader ``collate_fn``: pad to the batch's EasyOCR width and encode labels."""
        crops, labels = zip(*items)
        encoded = [self.charset.encode(label) for label in labels]
        return CropBatch(
            images=collate_crops(list(crops), self.imgH),
            targets=torch.tensor([c for seq in encoded for c in seq], dtype=torch.long),
            target_lengths=torch.tensor([len(seq) for seq in encoded], dtype=torch.long),
            labels=list(labels),
        )


class MixedCrops(Dataset):
    """Several :class:`CropDataset` end to end: the main set first, then the sets ``train.mix`` adds.

    ``blocks`` pairs each part's size with its share of the training samples; hand it to
    :class:`BucketBatchSampler` as ``mix`` so each epoch draws the parts in those shares.
    """

    def __init__(self, parts: Sequence[CropDataset], shares: Sequence[float]) -> None:
        if len(parts) != len(shares) or not parts:
            raise ValueError("MixedCrops needs one share per part")
        self.parts = list(parts)
        self.blocks = [(len(part), share) for part, share in zip(parts, shares)]
        self._starts = [0]
        for part in self.parts:
            self._starts.append(self._starts[-1] + len(part))
        self.widths = array("i")
        for part in self.parts:
            self.widths.extend(part.widths)
        self.longest_label = max(part.longest_label for part in self.parts)
        self.dropped: Counter[str] = sum((part.dropped for part in self.parts), Counter())
        pairs = [(part.fingerprint, share) for part, share in zip(parts, shares)]
        self.fingerprint = hashlib.sha256(repr(pairs).encode()).hexdigest()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, key: int | tuple[int, int, int]):
        index = key[0] if isinstance(key, tuple) else key
        part = bisect.bisect_right(self._starts, index) - 1
        local = index - self._starts[part]
        return self.parts[part][(local, *key[1:]) if isinstance(key, tuple) else local]

    def collate(self, items) -> CropBatch:
        """DataLoader ``collate_fn`` (the parts share charset and height)."""
        return self.parts[0].collate(items)


def mixed_epoch(rng: random.Random, blocks: Sequence[tuple[int, float]]) -> list[int]:
    """One epoch's indices over consecutive blocks of ``(size, share)``, shuffled.

    The first block is taken whole, once; the epoch's length is its size over its share, and every
    other block fills its share of that length with shuffled passes over its indices (a small set
    repeats, a large one is sampled afresh each epoch).
    """
    first_size, first_share = blocks[0]
    length = first_size / first_share
    order, offset = list(range(first_size)), first_size
    for size, share in blocks[1:]:
        want = max(1, round(length * share))
        drawn: list[int] = []
        while len(drawn) < want:
            lap = list(range(offset, offset + size))
            rng.shuffle(lap)
            drawn += lap[:want - len(drawn)]
        order += drawn
        offset += size
    rng.shuffle(order)
    return order


def check_batches_fill(samples: int, batch_size: int, world_size: int = 1) -> None:
    """Raise unless ``samples`` fill one batch of ``batch_size`` on each of ``world_size`` processes
    (what :class:`BucketBatchSampler` needs to draw any batch)."""
    if samples < batch_size * world_size:
        raise ValueError(f"{samples} samples cannot fill one batch of {batch_size} on each of "
                         f"{world_size} process(es)")


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar width, so little compute goes into padding; deterministic by seed.

    Indices are shuffled, taken ``pool`` batches at a time, sorted by width inside the pool, cut
    into batches, and the batches shuffled again. Yields ``num_batches`` batches in all, starting a
    new epoch as needed.

    Under data parallelism the global sequence holds ``num_batches x world_size`` batches and rank
    ``r`` takes every ``world_size``-th from ``r``, so ranks never share a sample within a step:
    each epoch is cut to a multiple of ``world_size`` batches (fewer than ``world_size`` of its
    shuffled batches are left out of it; the next epoch reshuffles everything), so no step pairs the
    end of one epoch with the start of the next, which may draw the same sample again.
    With ``mix`` (:attr:`MixedCrops.blocks`) each epoch draws the blocks in their shares
    (:func:`mixed_epoch`) instead of every index once. ``start`` skips the first steps (a resumed run continues the exact sequence). With ``tagged``
    each index comes as ``(index, step, slot)`` (step counted from 1, slot unique over ranks) for
    :class:`CropDataset`'s seeded augmentation.
    """

    def __init__(self, widths: Sequence[int], batch_size: int, num_batches: int, seed: int = 0, pool: int = 50,
                 start: int = 0, rank: int = 0, world_size: int = 1, tagged: bool = False,
                 mix: Sequence[tuple[int, float]] | None = None) -> None:
        check_batches_fill(len(widths), batch_size, world_size)
        self.widths, self.batch_size, self.num_batches = widths, batch_size, num_batches
        self.seed, self.pool = seed, pool
        self.start, self.rank, self.world_size, self.tagged = start, rank, world_size, tagged
        self.mix = list(mix) if mix and len(mix) > 1 else None

    def __len__(self) -> int:
        return max(self.num_batches - self.start, 0)

    def _epoch(self, rng: random.Random) -> list[list[int]]:
        if self.mix:
            order = mixed_epoch(rng, self.mix)
            if len(order) < self.batch_size * self.world_size:  # a main set smaller than a batch: a pool's
                while len(order) < self.batch_size * self.pool * self.world_size:  # worth of epochs in one,
                    order += mixed_epoch(rng, self.mix)  # so few samples fall off the last batch of the pool
        else:
            order = list(range(len(self.widths)))
            rng.shuffle(order)
        batches = []
        span = self.batch_size * self.pool
        for start in range(0, len(order), span):
            chunk = sorted(order[start:start + span], key=self.widths.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)
                        if len(chunk[i:i + self.batch_size]) == self.batch_size]
        rng.shuffle(batches)
        return batches[:len(batches) - len(batches) % self.world_size]

    def __iter__(self) -> Iterator[list]:
        rng = random.Random(self.seed)
        position, total = 0, self.num_batches * self.world_size
        while position < total:
            for batch in self._epoch(rng):
                if position == total:
                    return
                step, rank = divmod(position, self.world_size)
                position += 1
                if rank != self.rank or step < self.start:
                    continue
                if self.tagged:
                    base = rank * self.batch_size
                    yield [(index, step + 1, base + slot) for slot, index in enumerate(batch)]
                else:
                    yield batch
