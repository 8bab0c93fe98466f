from avengers.train.parallel import selective_ac_pattern


def _s(pattern):
    return "".join("T" if x else "F" for x in pattern)


def test_patterns_on_32_blocks():
    assert _s(selective_ac_pattern(32, 1)) == "T" * 32
    assert _s(selective_ac_pattern(32, "1/2")) == "TF" * 16
    assert _s(selective_ac_pattern(32, "1/3")) == ("FTF" * 11)[:32]
    assert _s(selective_ac_pattern(32, "2/3")) == ("TFT" * 11)[:32]
    assert _s(selective_ac_pattern(32, "1/5")) == ("FFTFF" * 7)[:32]
    assert sum(selective_ac_pattern(32, "1/3")) == 11
    assert sum(selective_ac_pattern(32, 0.5)) == 16


def test_float_and_string_fractions_agree_and_edges():
    assert selective_ac_pattern(32, 1 / 3) == selective_ac_pattern(32, "1/3")
    assert selective_ac_pattern(32, 0.2) == selective_ac_pattern(32, "1/5")
    assert not any(selective_ac_pattern(32, 0))
    assert all(selective_ac_pattern(32, 2))
