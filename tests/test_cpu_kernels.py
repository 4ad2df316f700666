"""The compiled CPU kernels: their min/max (what NonFiniteProvenance checks every fp32 CPU output with) against
numpy on both of its loops; their safety (buffers on another device, too short, of another type, indexes out of
range, a build of another version, empty input); and that CI builds them. (The histogram kernel's counts are held
to numpy in test_histograms.)"""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from geodiag.diagnostics.instruments import kernels
from geodiag.diagnostics.instruments.histogram_bins import BinLayout, kernel_tables
from geodiag.diagnostics.instruments.histograms import LogHistogram

pytestmark = pytest.mark.skipif(kernels.compiled is None and not os.environ.get("GEODIAG_REQUIRE_KERNEL"),
                                reason="the CPU kernels are not built here (no C compiler at install)")
SOURCE = Path(kernels.__file__).with_name("_cpu_kernels.c")


def test_the_kernels_are_built_where_ci_requires_them():
    """CI sets GEODIAG_REQUIRE_KERNEL: there kernels that failed to build are a failure, not a silent fallback."""
    assert kernels.compiled is not None, kernels.state()


@pytest.mark.parametrize("portable", [False, True], ids=["avx2_where_present", "portable"])
@pytest.mark.parametrize("n", [1, 7, 15, 16, 17, 33, 1000, 65537])
def test_min_max_matches_numpy_and_turns_nan_on_any_nan(n, portable):
    rng = np.random.default_rng(n)
    values = (rng.standard_normal(n) * 10.0 ** rng.uniform(-40, 38, n)).astype(np.float32)
    values[rng.integers(0, n)] = np.inf if n > 2 else values[0]
    values[rng.integers(0, n)] = -np.inf if n > 4 else values[0]

    def min_max(array):
        return kernels.compiled.min_max_fp32(array, portable)

    assert min_max(values) == (float(values.min()), float(values.max()))
    for position in {0, n // 2, n - 1}:  # a NaN in the vector body or in the tail
        with_nan = values.copy()
        with_nan[position] = np.nan
        low, high = min_max(with_nan)
        assert np.isnan(low) and np.isnan(high), position


def test_min_max_reads_strided_views_and_declines_other_dtypes():
    x = torch.randn(8, 8)
    x[3, 0] = float("inf")
    assert kernels.min_max(x) == (float(x.min()), float(x.max()))
    assert kernels.min_max(x[:, 1:]) == (float(x[:, 1:].min()), float(x[:, 1:].max()))  # no Inf in that view
    assert kernels.min_max(x.clone().requires_grad_()) == (float(x.min()), float(x.max()))
    assert kernels.min_max(x.double()) is None
    assert kernels.min_max(x.half()) is None


def test_empty_input_has_no_extrema_and_counts_nothing():
    assert kernels.min_max(torch.empty(0)) is None and kernels.min_max(torch.empty(3, 0)) is None
    assert kernels.compiled.min_max_fp32(np.empty(0, dtype=np.float32)) is None
    h = LogHistogram()
    kernels.compiled.count_fp32(*_buffers(values=np.empty(0, dtype=np.float32), counts=h._host_buffers[0],
                                          moments=h._host_buffers[1], extrema=h._host_buffers[2]))
    assert not h._counts.any() and not h._moments.any() and torch.isinf(h._extrema).all()
    h.update(torch.empty(0), torch.empty(2, 0))
    assert h.to_dict()["count"] == 0


# ---------------------------------------------------------------------------------------------- device mismatch
# Each runs in a fresh interpreter, as what they guard against kills it: before the checks the first handed the kernel
# the meta buffers' address (exit 139, a segmentation fault). Meta stands for any device whose memory the host cannot
# address (CUDA alike): the kernel is chosen, and given buffers, only when everything is on the CPU.
MISMATCHES = {
    "histogram_on_meta": ("LogHistogram(device='meta').update(torch.randn(1000))",
                          "ValueError: LogHistogram on meta cannot count a tensor on cpu: a meta tensor holds no "
                          "values, a meta histogram no counts"),
    "tensor_on_meta": ("LogHistogram().update(torch.randn(1000, device='meta'))",
                       "ValueError: LogHistogram on cpu cannot count a tensor on meta: a meta tensor holds no "
                       "values, a meta histogram no counts"),
    "kernel_given_meta_values": (
        "kernels.count_fp32(torch.randn(1000, device='meta'), "
        "histograms._kernel_tables(BinLayout(), ()), *LogHistogram()._host_buffers)",
        "ValueError: the CPU kernel cannot read values on meta: its buffers must all be on the CPU"),
    "kernel_given_a_meta_histograms_tensors": (
        "h = LogHistogram(device='meta'); kernels.count_fp32(torch.randn(1000), "
        "histograms._kernel_tables(h.layout, ()), h._counts, h._moments, h._extrema)",
        "TypeError: counts: expected a C-contiguous, writable buffer, got Tensor"),
}


@pytest.mark.parametrize("name", list(MISMATCHES))
def test_a_buffer_on_another_device_is_a_one_line_error_not_a_crash(name):
    statement, message = MISMATCHES[name]
    script = ("import torch\nfrom geodiag.diagnostics.instruments import histograms, kernels\n"
              "from geodiag.diagnostics.instruments.histogram_bins import BinLayout\n"
              "from geodiag.diagnostics.instruments.histograms import LogHistogram\n" + statement)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr  # an exception, not a signal (-11) or 139
    assert result.stderr.strip().splitlines()[-1] == message


# ---------------------------------------------------------------------------------------------- lengths, types
def _arrays() -> dict:
    """Writable copies of the default layout's tables, as make_tables takes them."""
    tables = kernel_tables(BinLayout(), ())
    return {"offset": tables.offset.copy(), "cuts": tables.cuts.copy(), "n_positive": tables.n_positive,
            "source": tables.source.copy(), "target": tables.target.copy()}


def _tables(**changed):
    return kernels.compiled.make_tables(*{**_arrays(), **changed}.values())


def _buffers(**changed) -> list:
    """count_fp32's arguments on a default histogram's buffers (as numpy views), with ``changed`` replaced."""
    counts, moments, extrema = LogHistogram()._host_buffers
    buffers = {"values": np.linspace(-3, 3, 100, dtype=np.float32), "tables": _tables(), "counts": counts,
               "moments": moments, "extrema": extrema}
    return list({**buffers, **changed}.values())


@pytest.mark.parametrize("changed, error, message", [
    ({"offset": np.zeros(100, dtype=np.uint32)}, ValueError, "offset: 100 cells, expected 65536"),
    ({"offset": np.zeros(1 << 16, dtype=np.int64)}, TypeError, "offset: expected items of format 'I'"),
    ({"cuts": np.zeros(4, dtype=np.float32)}, TypeError, "cuts: expected items of format 'I'"),
    ({"source": np.zeros(3, dtype=np.int64)}, ValueError, "source and target: 3 and"),
    ({"n_positive": -1}, ValueError, "n_positive: -1 is not within the"),
], ids=["short_offset", "offset_of_int64", "cuts_of_float", "fold_lengths_differ", "negative_n_positive"])
def test_tables_of_the_wrong_length_or_type_are_rejected(changed, error, message):
    with pytest.raises(error, match=re.escape(message)):
        _tables(**changed)


def test_count_buffers_of_the_wrong_length_type_or_layout_are_rejected():
    h = LogHistogram()
    needed = int(kernel_tables(BinLayout(), ()).target.max()) + 1  # the counts the tables fold into
    with pytest.raises(ValueError, match=re.escape(f"{needed - 1}, 2 and 3 entries, expected at least {needed}")):
        kernels.compiled.count_fp32(*_buffers(counts=h._host_buffers[0][:needed - 1]))
    with pytest.raises(ValueError, match=re.escape(f"{len(h._counts)}, 1 and 3 entries")):
        kernels.compiled.count_fp32(*_buffers(moments=np.zeros(1)))
    with pytest.raises(TypeError, match=re.escape("values: expected items of format 'f' (4 bytes), got 'd'")):
        kernels.compiled.count_fp32(*_buffers(values=np.zeros(10)))
    with pytest.raises(TypeError, match="values: expected a C-contiguous buffer"):
        kernels.compiled.count_fp32(*_buffers(values=np.zeros(10, dtype=np.float32)[::2]))
    read_only = np.zeros(3)
    read_only.flags.writeable = False
    with pytest.raises(TypeError, match="extrema: expected a C-contiguous, writable buffer"):
        kernels.compiled.count_fp32(*_buffers(extrema=read_only))
    with pytest.raises(TypeError, match="argument 2 must be PyCapsule, not dict"):
        kernels.compiled.count_fp32(*_buffers(tables=_arrays()))
    assert not h._counts.any()  # nothing was written
    kernels.compiled.count_fp32(*_buffers(counts=h._host_buffers[0][:needed]))  # exactly as many: counted
    assert h._counts[0] == 100


# ---------------------------------------------------------------------------------------------- indexes
def _sending_from(low: int) -> np.ndarray:
    """An offset table whose cell of 1.0 (16256) sends its first pattern to ``low`` (u - offset): its values to
    segments low >> 16 .. (low + 0xffff) >> 16, unless that wraps around 2^32."""
    offset = _arrays()["offset"]
    cell = int(np.array(1.0, dtype=np.float32).view(np.uint32)) >> 16
    offset[cell] = ((cell << 16) - low) % (1 << 32)
    return offset


def test_indexes_out_of_range_are_rejected():
    arrays = _arrays()
    n_segments = len(arrays["cuts"]) + 2
    _tables(offset=_sending_from(n_segments << 16))  # the spill segment is in range
    with pytest.raises(ValueError, match=f"offset: cell 16256 sends values beyond the {n_segments} segments"):
        _tables(offset=_sending_from((n_segments + 1) << 16))
    with pytest.raises(ValueError, match=f"offset: cell 16256 sends values beyond the {n_segments} segments"):
        _tables(offset=_sending_from(n_segments << 16 | 1))  # its last values one segment beyond the spill
    with pytest.raises(ValueError, match="offset: cell 16256 sends"):
        _tables(offset=_sending_from((1 << 32) - 1))  # wraps: segments 65535, then 0; its last pattern alone is 0
    with pytest.raises(ValueError, match=f"source/target: entry 2 maps segment {n_segments} to count"):
        source = arrays["source"].copy()
        source[2] = n_segments
        _tables(source=source)
    with pytest.raises(ValueError, match="source/target: entry 0 maps segment 0 to count -1"):
        target = arrays["target"].copy()
        target[0] = -1
        _tables(target=target)
    with pytest.raises(ValueError, match="n_positive: .* is not within the"):
        _tables(n_positive=len(arrays["cuts"]) + 1)
    with pytest.raises(ValueError, match="expected at least 1000001"):  # a target beyond the histogram's counts
        target = arrays["target"].copy()
        target[-1] = 1_000_000
        kernels.compiled.count_fp32(*_buffers(tables=_tables(target=target)))


def test_the_kernel_counts_with_its_own_copy_of_the_tables():
    """What make_tables checked is what counts: overwriting the caller's arrays afterwards changes nothing."""
    arrays = _arrays()
    tables = kernels.compiled.make_tables(*arrays.values())
    values = np.geomspace(1e-30, 1e30, 999, dtype=np.float32)
    kept, overwritten = LogHistogram(), LogHistogram()
    kernels.compiled.count_fp32(values, tables, *kept._host_buffers)
    for name in ("offset", "source", "target"):
        arrays[name][:] = np.iinfo(arrays[name].dtype).max  # every index far out of range
    kernels.compiled.count_fp32(values, tables, *overwritten._host_buffers)
    assert torch.equal(kept.packed(), overwritten.packed()) and kept.to_dict()["count"] == 999


# ---------------------------------------------------------------------------------------------- version
def test_the_source_and_the_loaded_module_are_the_same_version():
    declared = re.search(r"#define GEODIAG_KERNEL_VERSION (\d+)", SOURCE.read_text())
    assert declared and int(declared.group(1)) == kernels.KERNEL_VERSION == kernels.compiled.VERSION


def test_a_build_of_another_version_is_not_loaded_and_doctor_says_why():
    """A stale build (here: the built module's VERSION changed before geodiag imports it) falls back to the torch
    paths: histograms still count, provenance gets no kernel min/max, and the doctor's line names both versions."""
    script = ("from geodiag.diagnostics.instruments import _cpu_kernels\n"
              f"_cpu_kernels.VERSION = {kernels.KERNEL_VERSION - 1}\n"
              "import torch\nfrom geodiag.diagnostics.instruments import kernels\n"
              "from geodiag.diagnostics.instruments.histograms import LogHistogram\n"
              "h = LogHistogram()\nh.update(torch.tensor([1.0, -2.0, float('nan')]))\nrow = h.to_dict()\n"
              "print(kernels.compiled is None, kernels.min_max(torch.ones(3)), row['count'], row['nan'], row['min'])\n"
              "print(kernels.state())\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    used, line = result.stdout.strip().splitlines()
    assert used == "True None 3 1 -2.0"
    assert line.startswith(f"not built from this source (the compiled module is version {kernels.KERNEL_VERSION - 1}, "
                           f"_cpu_kernels.c version {kernels.KERNEL_VERSION})")
    module, reason = kernels.load(expected=kernels.KERNEL_VERSION + 1)  # the same check from the other side
    assert module is None and f"version {kernels.KERNEL_VERSION}, _cpu_kernels.c version" in reason
    assert kernels.load() == (kernels.compiled, kernels.state())


def test_unused_forces_the_torch_paths_inside_the_block_only():
    with kernels.unused():
        assert kernels.compiled is None and kernels.min_max(torch.ones(2)) is None
    assert kernels.min_max(torch.ones(2)) == (1.0, 1.0)
