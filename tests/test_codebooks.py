"""Codebooks: NF4 derived from normal quantiles equals bitsandbytes' table, bit for bit."""

import numpy as np

from qlora_np.quant import codebooks
from qlora_np.quant.codebooks import FORMATS


def test_nf4_derivation_matches_bnb_table_bit_exactly(tables):
    derived = codebooks.derive_nf4_codebook()
    assert derived.dtype == np.float32
    assert derived.tobytes() == tables["nf4"].astype(np.float32).tobytes()


def test_nf4_has_exact_zero_and_ends_at_minus_one_and_one():
    nf4 = FORMATS["nf4"].codebook
    assert nf4[0] == -1.0 and nf4[-1] == 1.0 and nf4[7] == 0.0
    assert np.all(np.diff(nf4) > 0)


def test_fp4_table_matches_bnb_including_positive_zero_at_code_8(tables):
    fp4 = FORMATS["fp4"].codebook
    assert fp4.tobytes() == tables["fp4"].astype(np.float32).tobytes()
    assert fp4[8] == 0.0 and not np.signbit(fp4[8])


def test_midpoints_and_sort_order_match_bnb(tables):
    assert np.array_equal(FORMATS["nf4"].midpoints, tables["nf4_midpoints"])
    assert np.array_equal(FORMATS["fp4"].midpoints, tables["fp4_midpoints_sorted"])
    assert np.array_equal(FORMATS["fp4"].sort_order, tables["fp4_sort_order"])


def test_zero_code_is_the_code_a_scaled_zero_gets():
    assert FORMATS["nf4"].zero_code == 7
    assert FORMATS["fp4"].zero_code == 0        # midpoint 7 of FP4 is exactly 0.0: ties go low
    assert FORMATS["int4"].zero_code == 8


def test_int4_symmetric_codebook_is_evenly_spaced_in_sevenths():
    np.testing.assert_array_equal(FORMATS["int4"].codebook * 7, np.arange(-8, 8, dtype=np.float32))


def test_dynamic_map_is_bnb_table_and_derivation_agrees_to_two_ulp(tables):
    table = codebooks.dynamic_map()
    assert table.tobytes() == tables["dynamic_map"].astype(np.float32).tobytes()
    derived = codebooks.derive_dynamic_map()
    assert derived.shape == (256,)
    ulp = np.spacing(np.abs(table))
    assert np.all(np.abs(derived - table) <= 2 * ulp)


def test_nested_lut_counts_midpoints_below_each_grid_point():
    lut = codebooks.nested_code_lut()
    assert lut.shape == (65536,) and lut.dtype == np.uint8
    assert lut[0] == 0 and lut[-1] == 255
    assert np.all(np.diff(lut.astype(int)) >= 0)
    # grid point j is float32(-1 + float32(2j)/65535); its entry counts the map midpoints below it
    code = codebooks.dynamic_map()
    midpoints = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    for j in (0, 1, 12345, 32767, 32768, 50000, 65534, 65535):
        grid_value = np.float32(np.float32(-1) + np.float32(2 * j) / np.float32(65535))
        assert lut[j] == np.count_nonzero(midpoints < grid_value)
