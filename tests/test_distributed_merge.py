"""Histograms recorded on two DDP ranks (gloo, CPU) and all-reduced equal the histogram of all the data."""
import math
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from geodiag.diagnostics.instruments.histograms import LogHistogram, decade_grid

WORLD_SIZE = 2


def _rank_data(rank: int) -> torch.Tensor:
    """Different data per rank: different scales, and non-finite values only on rank 1."""
    generator = torch.Generator().manual_seed(rank)
    values = torch.randn(4096, generator=generator, dtype=torch.float64) * 10.0 ** (4 * rank - 3)
    if rank == 1:
        values[:3] = torch.tensor([math.nan, math.inf, 0.0], dtype=torch.float64)
    return values


def _worker(rank: int, init_file: str, result_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        histogram = LogHistogram(thresholds=decade_grid())
        histogram.update(_rank_data(rank))
        histogram.all_reduce()
        if rank == 0:
            with open(result_file, "wb") as handle:
                pickle.dump(histogram.to_dict(), handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_all_reduced_histogram_equals_the_histogram_of_the_concatenated_data(tmp_path):
    result_file = tmp_path / "rank0.pkl"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(result_file)), nprocs=WORLD_SIZE, join=True)
    with open(result_file, "rb") as handle:
        reduced = pickle.load(handle)

    reference = LogHistogram(thresholds=decade_grid())
    reference.update(torch.cat([_rank_data(rank) for rank in range(WORLD_SIZE)]))
    expected = reference.to_dict()
    for key in ("sum", "mean", "rms"):
        assert reduced.pop(key) == pytest.approx(expected.pop(key), rel=1e-12)
    assert reduced == expected
    assert expected["nan"] == 1 and expected["min"] < -1 and expected["max"] > 1
