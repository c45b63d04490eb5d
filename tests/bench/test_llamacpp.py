"""Reading llama.cpp's rates from its logs, and finding its programs."""

from __future__ import annotations

import pytest

from voice.bench import llamacpp

# Lines as llama.cpp 0c1e570 prints them (llama-completion, llama-speculative-simple).
PLAIN_LOG = """
0.02.913.554 I common_perf_print: prompt eval time =     305.81 ms /    24 tokens (   12.74 ms per token,    78.48 tokens per second)
0.02.913.568 I common_perf_print:        eval time =    1455.28 ms /    47 runs   (   30.96 ms per token,    32.30 tokens per second)
"""
SPECULATIVE_LOG = """
0.07.072.533 I encoded   24 tokens in    0.722 seconds, speed:   33.232 t/s
0.07.072.558 I decoded   49 tokens in    4.269 seconds, speed:   11.479 t/s
0.07.072.588 I n_draft   = 2
0.07.072.617 I n_drafted = 53
0.07.072.631 I n_accept  = 22
"""


def test_parse_plain():
    result = llamacpp.parse_plain(PLAIN_LOG)
    assert result.tokens == 48
    assert result.tokens_per_s == pytest.approx(32.30)
    assert result.first_token_s == pytest.approx(0.30581)
    assert result.total_s == pytest.approx(0.30581 + 47 / 32.30)


def test_parse_speculative():
    result = llamacpp.parse_speculative(SPECULATIVE_LOG)
    assert (result.tokens, result.drafted, result.accepted) == (49, 53, 22)
    assert result.tokens_per_s == pytest.approx(11.479)
    assert result.total_s == pytest.approx(0.722 + 4.269)


@pytest.mark.parametrize("parse", [llamacpp.parse_plain, llamacpp.parse_speculative])
def test_log_without_rates_is_an_error(parse):
    with pytest.raises(ValueError, match="llama.cpp's output"):
        parse("error: failed to load model\n")


def test_find_programs_in_folder(tmp_path):
    assert llamacpp.find_programs(str(tmp_path)) == {}
    (tmp_path / "llama-completion").write_text("")
    (tmp_path / "llama-speculative-simple").write_text("")
    found = llamacpp.find_programs(str(tmp_path))
    assert found == {"plain": tmp_path / "llama-completion", "speculative": tmp_path / "llama-speculative-simple"}


def test_failing_program_reports_its_last_line(tmp_path):
    program = tmp_path / "llama-completion"
    program.write_text("#!/bin/sh\necho 'error: unknown argument' >&2\nexit 3\n")
    program.chmod(0o755)
    with pytest.raises(RuntimeError, match="exited with 3: error: unknown argument"):
        llamacpp.run_program(program, tmp_path / "model.gguf", "hello", 4, 1)
