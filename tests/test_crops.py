"""Word-crop datasets: CTC-feasibility filtering, collation, width-bucketed batch sampling."""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from training.charset import Charset
from training.crops import BucketBatchSampler, CropDataset, MixedCrops, mixed_epoch
from training.data.lmdb_store import LmdbDataset, LmdbWriter
from training.model import Recognizer, RecognizerConfig, output_length

KOREAN = Charset.named("korean_g2")
HANGUL = [c for c in KOREAN.chars if "가" <= c <= "힣"]


def _png(h: int, w: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    ok, buf = cv2.imencode(".png", rng.integers(0, 256, size=(h, w), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def _lmdb(path: Path, samples: list[tuple[tuple[int, int], str]]) -> LmdbDataset:
    with LmdbWriter(path) as writer:
        for i, ((h, w), label) in enumerate(samples):
            writer.add(_png(h, w, i), label)
    return LmdbDataset(path)


def _distinct(n: int) -> str:
    return "".join(HANGUL[:n])


def test_output_length_matches_the_model():
    model = Recognizer(RecognizerConfig(num_class=5, output_channel=16, hidden_size=8)).eval()
    with torch.no_grad():
        for width in (64, 128, 320):
            assert model(torch.zeros(1, 1, 64, width)).shape[1] == output_length(width)


def test_dataset_keeps_feasible_labels_and_counts_the_rest(tmp_path):
    # a 32x64 crop is padded to width 128, where the model emits 31 steps
    steps = output_length(128)
    assert steps == 31
    samples = [
        ((32, 64), _distinct(steps)),                          # 0 keep: exactly fits
        ((32, 64), _distinct(steps + 1)),                      # 1 too long
        ((32, 64), _distinct(steps - 2) + "호호"),              # 2 too long: 31 chars + 1 repeat = 32
        ((32, 64), _distinct(steps - 3) + "호호"),              # 3 keep: 30 chars + 1 repeat = 31
        ((32, 64), "서울漢"),                                   # 4 out of charset
        ((32, 64), ""),                                        # 5 empty
        ((10, 2000), "가"),                                    # 6 too wide: padded to 12,800
        ((64, 16), "가나"),                                     # 7 keep: a vertical crop pads to 256
        ((20, 70), "제2023-15호"),                              # 8 keep
    ]
    ds = CropDataset(_lmdb(tmp_path / "set", samples), KOREAN)
    assert list(ds.indices) == [0, 3, 7, 8]
    assert dict(ds.dropped) == {"too_long": 2, "out_of_charset": 1, "empty_label": 1, "too_wide": 1}
    assert list(ds.widths) == [128, 128, 256, 256]
    assert len(ds) == 4
    image, label = ds[3]
    assert label == "제2023-15호"
    crop, pad = image
    assert crop.shape[0] == 64 and pad == 256 and crop.dtype == np.float32
    assert -1.0 <= crop.min() and crop.max() <= 1.0


def test_max_width_is_configurable(tmp_path):
    source = _lmdb(tmp_path / "set", [((20, 70), "가나"), ((20, 300), "가나다")])
    assert list(CropDataset(source, KOREAN).widths) == [256, 960]
    narrow = CropDataset(source, KOREAN, max_width=512)
    assert list(narrow.indices) == [0] and narrow.dropped == {"too_wide": 1}


def test_collate_pads_and_encodes(tmp_path):
    samples = [((20, 70), "서울"), ((30, 200), "특별시청"), ((16, 16), "가")]
    ds = CropDataset(_lmdb(tmp_path / "set", samples), KOREAN)
    assert len(ds) == 3
    batch = ds.collate([ds[i] for i in range(3)])
    assert batch.images.dtype == torch.float32
    assert tuple(batch.images.shape) == (3, 1, 64, 448)  # ceil(200 / 30) * 64
    assert batch.images.shape[3] % 64 == 0
    assert batch.labels == ["서울", "특별시청", "가"]
    assert batch.targets.tolist() == KOREAN.encode("서울") + KOREAN.encode("특별시청") + KOREAN.encode("가")
    assert batch.target_lengths.tolist() == [2, 4, 1]
    assert int(batch.target_lengths.sum()) == batch.targets.numel()
    # narrower crops are padded on the right by repeating their last column
    first, _ = ds[0]
    w = first[0].shape[1]
    assert torch.equal(batch.images[0, 0, :, :w], torch.from_numpy(first[0]))
    assert torch.equal(batch.images[0, 0, :, w:], batch.images[0, 0, :, w - 1:w].expand(-1, 448 - w))


def test_collated_batch_trains_with_ctc(tmp_path):
    samples = [((20, 70), "서울"), ((30, 200), "특별시청"), ((24, 24), "가가")]
    ds = CropDataset(_lmdb(tmp_path / "set", samples), KOREAN)
    batch = ds.collate([ds[i] for i in range(len(ds))])
    model = Recognizer(RecognizerConfig(num_class=KOREAN.num_class, output_channel=16, hidden_size=8))
    logits = model(batch.images)
    steps = logits.shape[1]
    assert steps == output_length(batch.images.shape[3])
    loss = torch.nn.functional.ctc_loss(
        logits.log_softmax(2).permute(1, 0, 2), batch.targets,
        torch.full((len(ds),), steps, dtype=torch.long), batch.target_lengths, blank=0, zero_infinity=False)
    assert torch.isfinite(loss)


# -- bucketing --------------------------------------------------------------------------------------

def _widths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [64 * rng.randint(1, 16) for _ in range(n)]


def test_bucket_sampler_yields_num_batches_of_batch_size():
    widths = _widths(500)
    sampler = BucketBatchSampler(widths, batch_size=8, num_batches=100, seed=3)
    batches = list(sampler)
    assert len(sampler) == 100 and len(batches) == 100  # more than one epoch (62 full batches)
    assert all(len(b) == 8 for b in batches)
    assert all(0 <= i < 500 for b in batches for i in b)
    first_epoch = [i for b in batches[:62] for i in b]
    assert len(set(first_epoch)) == len(first_epoch)  # no sample twice within an epoch
    assert list(sampler) == batches  # iterating again gives the same order


def test_bucket_sampler_is_deterministic_by_seed():
    widths = _widths(300)
    a = list(BucketBatchSampler(widths, 4, 30, seed=1))
    assert a == list(BucketBatchSampler(widths, 4, 30, seed=1))
    assert a != list(BucketBatchSampler(widths, 4, 30, seed=2))


def test_bucket_sampler_groups_similar_widths():
    widths = _widths(800, seed=5)
    batches = list(BucketBatchSampler(widths, batch_size=16, num_batches=50, seed=0))
    rng = random.Random(0)
    order = list(range(len(widths)))
    rng.shuffle(order)
    baseline = [order[i:i + 16] for i in range(0, 800, 16)][:50]

    def mean_range(bs):
        return sum(max(widths[i] for i in b) - min(widths[i] for i in b) for b in bs) / len(bs)

    assert mean_range(batches) < 0.25 * mean_range(baseline)
    # batch order is shuffled too, not narrow-to-wide
    firsts = [widths[b[0]] for b in batches]
    assert firsts != sorted(firsts)


def test_bucket_sampler_rejects_too_few_samples():
    with pytest.raises(ValueError, match="3 samples"):
        BucketBatchSampler([64, 128, 64], batch_size=4, num_batches=1)
    assert len(list(BucketBatchSampler([64, 128, 64, 64], batch_size=4, num_batches=3))) == 3


def test_sampler_drives_a_dataloader(tmp_path):
    samples = [((20, 20 * k), HANGUL[k] * 1) for k in range(1, 9)] * 2
    ds = CropDataset(_lmdb(tmp_path / "set", samples), KOREAN)
    sampler = BucketBatchSampler(ds.widths, batch_size=4, num_batches=5, seed=0, pool=4)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=ds.collate)
    batches = list(loader)
    assert len(batches) == 5
    for batch, indices in zip(batches, sampler):
        assert batch.images.shape[0] == 4
        assert batch.images.shape[3] == max(ds.widths[i] for i in indices)
        assert batch.labels == [ds[i][1] for i in indices]


def test_a_mixed_epoch_takes_the_main_set_once_and_fills_each_share():
    rng = random.Random(0)
    order = mixed_epoch(rng, [(90, 0.75), (7, 0.2), (1000, 0.05)])  # 120 in all: 90 + 24 + 6
    assert len(order) == 120
    assert sorted(i for i in order if i < 90) == list(range(90))         # every main sample exactly once
    small = [i for i in order if 90 <= i < 97]
    assert len(small) == 24 and set(small) == set(range(90, 97))       # a small set repeats, every sample
    assert max(small.count(i) for i in set(small)) - min(small.count(i) for i in set(small)) <= 1  # in whole passes
    large = [i for i in order if i >= 97]
    assert len(large) == 6 and len(set(large)) == 6 and all(i < 1097 for i in large)
    assert order != sorted(order)                                      # shuffled, not block after block


def test_a_mixed_sampler_keeps_the_shares_over_a_run_and_draws_new_extras_each_epoch():
    widths = _widths(200) + _widths(2000, seed=1)
    sampler = BucketBatchSampler(widths, batch_size=8, num_batches=300, seed=4, mix=[(200, 0.8), (2000, 0.2)])
    indices = [i for batch in sampler for i in batch]
    extra = [i for i in indices if i >= 200]
    assert abs(len(extra) / len(indices) - 0.2) < 0.02
    assert len(set(extra)) > 300  # ~50 extras an epoch, drawn afresh from the 2,000 (the same 50 again: 50)
    assert list(sampler) == list(BucketBatchSampler(widths, 8, 300, seed=4, mix=[(200, 0.8), (2000, 0.2)]))
    # without a mix the order is the one the sampler always gave (runs before train.mix are reproduced)
    assert list(BucketBatchSampler(widths[:200], 8, 30, seed=4, mix=[(200, 1.0)])) == \
        list(BucketBatchSampler(widths[:200], 8, 30, seed=4))


def test_a_main_set_smaller_than_a_batch_still_fills_batches_in_its_share():
    # 2 real crops at share .7 and 59 generated at .3: an epoch of 2 + 1 samples cannot fill a batch
    # of 4; the sampler used to spin on empty epochs forever (a 100-crop set, batch 192, hung alike)
    widths = _widths(2) + _widths(59, seed=1)
    batches = list(BucketBatchSampler(widths, batch_size=4, num_batches=50, seed=0, mix=[(2, 0.7), (59, 0.3)]))
    assert len(batches) == 50 and all(len(b) == 4 for b in batches)
    indices = [i for batch in batches for i in batch]
    assert abs(sum(i < 2 for i in indices) / len(indices) - 2 / 3) < 0.05  # 2 main in every 3 drawn


def test_mixed_crops_read_each_part_by_global_index(tmp_path):
    main = CropDataset(_lmdb(tmp_path / "main", [((20, 40), "가"), ((20, 60), "나다"), ((20, 40), "라")]), KOREAN)
    extra = CropDataset(_lmdb(tmp_path / "extra", [((20, 40), "서울"), ((20, 4000), "너무넓다")]), KOREAN,
                        max_width=512)
    mixed = MixedCrops([main, extra], [0.7, 0.3])
    assert len(mixed) == 4 and mixed.blocks == [(3, 0.7), (1, 0.3)]
    assert [mixed[i][1] for i in range(4)] == ["가", "나다", "라", "서울"]
    assert mixed.widths == main.widths + extra.widths
    assert mixed.longest_label == 2 and mixed.dropped["too_wide"] == 1
    assert mixed[(3, 5, 0)][1] == "서울"  # tagged keys (augmentation) reach the part too
    batch = mixed.collate([mixed[0], mixed[3]])
    assert batch.labels == ["가", "서울"] and batch.target_lengths.tolist() == [1, 2]


def test_the_index_of_kept_samples_costs_a_few_bytes_a_sample(tmp_path):
    """Was: the kept samples' indices and pad widths were lists of Python ints, about 46 bytes a sample
    (210 MB at train start for 4.5M crops, and a copy in each DataLoader worker as reading an item touched
    its reference count). Now flat integer arrays: 12 bytes a sample."""
    import tracemalloc

    crops = [_png(32, 64 + 16 * i, i) for i in range(4)]
    sizes, held = (1500, 6000), []
    for n in sizes:
        with LmdbWriter(tmp_path / f"set{n}") as writer:
            for i in range(n):
                writer.add(crops[i % 4], "서울")
    CropDataset(LmdbDataset(tmp_path / f"set{sizes[0]}"), KOREAN)  # imports and caches, outside the count
    for n in sizes:
        source = LmdbDataset(tmp_path / f"set{n}")
        tracemalloc.start()
        try:
            ds = CropDataset(source, KOREAN)
            held.append(tracemalloc.get_traced_memory()[0])  # what the dataset keeps while training reads it
        finally:
            tracemalloc.stop()
        assert len(ds) == n
    growth = (held[1] - held[0]) / (sizes[1] - sizes[0])
    assert growth < 25, f"memory held grew {growth:.0f} bytes per sample ({held[0]:,} -> {held[1]:,} bytes)"
