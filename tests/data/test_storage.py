"""Storage: round trip, chunk layout, and reads that decode only the chunks they touch."""
from __future__ import annotations

import numpy as np
import pytest

from volssl.data.storage import SUFFIX, default_chunks, load_array, open_array, save_array


def _smooth(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Compressible float32 data (cumulative sums of noise), so LZ4 really compresses it."""
    return np.cumsum(rng.standard_normal(shape), axis=-1).astype(np.float32)


def test_round_trip_keeps_values_and_dtype(tmp_path):
    rng = np.random.default_rng(0)
    image = _smooth(rng, (2, 70, 33, 20))
    label = rng.integers(0, 3, (70, 33, 20)).astype(np.uint8)
    save_array(tmp_path / f"img{SUFFIX}", image)
    save_array(tmp_path / f"lab{SUFFIX}", label)
    back = load_array(tmp_path / f"img{SUFFIX}")
    assert back.dtype == np.float32 and np.array_equal(back, image)
    lab = load_array(tmp_path / f"lab{SUFFIX}", nthreads=1)
    assert lab.dtype == np.uint8 and np.array_equal(lab, label)
    assert not list(tmp_path.glob(".*.tmp*")), "atomic write left a temporary file"


def test_layout_is_chunked_per_channel():
    assert default_chunks((3, 200, 100, 40)) == ((1, 64, 64, 40), (1, 16, 16, 16))
    assert default_chunks((10, 8, 300)) == ((10, 8, 64), (10, 8, 16))


def test_slice_equals_numpy_slice(tmp_path):
    image = _smooth(np.random.default_rng(1), (2, 130, 70, 66))
    save_array(tmp_path / "a.b2nd", image)
    arr = open_array(tmp_path / "a.b2nd")
    assert arr.chunks == (1, 64, 64, 64) and arr.blocks == (1, 16, 16, 16)
    window = (slice(1, 2), slice(50, 129), slice(3, 70), slice(17, 66))
    assert np.array_equal(arr[window], image[window])


def test_window_read_decodes_only_touched_chunks(tmp_path):
    """Corrupt the last chunk on disk: a window in the first chunk still reads exactly, while a full
    decode (which must decompress the corrupted chunk) fails."""
    image = _smooth(np.random.default_rng(2), (1, 128, 64, 64))
    path = tmp_path / "a.b2nd"
    save_array(path, image)
    arr = open_array(path)
    assert arr.schunk.nchunks == 2
    last = arr.schunk.get_chunk(1)
    del arr
    raw = bytearray(path.read_bytes())
    pos = raw.find(last)
    assert pos > 0
    header = 64  # keep the chunk header; garble the compressed payload
    raw[pos + header : pos + len(last)] = np.random.default_rng(3).integers(0, 256, len(last) - header, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(raw))
    arr = open_array(path)
    assert np.array_equal(arr[0:1, 5:60, 0:40, 10:50], image[0:1, 5:60, 0:40, 10:50])
    with pytest.raises(Exception):
        full = arr[...]
        assert np.array_equal(full, image)  # reached only if decoding garbage did not raise


def test_open_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.b2nd"):
        open_array(tmp_path / "nope.b2nd")


def test_save_rejects_low_rank(tmp_path):
    with pytest.raises(ValueError, match=">= 3 axes"):
        save_array(tmp_path / "x.b2nd", np.zeros((4, 4), np.float32))
