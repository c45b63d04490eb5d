"""llama.cpp on the same GGUF files, as the benchmark's outside reference.

``voice bench llm`` runs llama.cpp's own programs as subprocesses, one per prompt, with
the same chat-formatted prompt text, greedy sampling and thread count, and reads the
rates they print. Two programs are used where found (``--llama-cpp DIR`` or PATH):

- ``llama-completion`` (called ``llama-cli`` before llama.cpp moved the chat interface
  there): the target alone; its "eval time" line gives tokens per second after the first;
- ``llama-speculative-simple``: the target with the draft model drafting
  ``--spec-draft-n-max`` tokens; its "decoded ... speed" line gives the rate.

Each run loads the model again (under a second from the page cache); the rates
exclude loading and the prompt.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

PLAIN_PROGRAMS = ("llama-completion", "llama-cli")
SPECULATIVE_PROGRAM = "llama-speculative-simple"
# Each run is one short answer; a run past this is treated as failed, not waited for.
_TIMEOUT_S = 300

_EVAL_RATE = re.compile(r"\beval time\s*=\s*[\d.]+ ms\s*/\s*(\d+) runs.*?([\d.]+) tokens per second")
_PROMPT_EVAL = re.compile(r"prompt eval time\s*=\s*([\d.]+) ms")
_DECODED = re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s*([\d.]+) t/s")
_ENCODED = re.compile(r"encoded\s+\d+ tokens in\s+([\d.]+) seconds")
_DRAFTED = re.compile(r"n_drafted\s*=\s*(\d+)")
_ACCEPTED = re.compile(r"n_accept\s*=\s*(\d+)")


@dataclass
class LlamaCppResult:
    tokens: int
    tokens_per_s: float
    first_token_s: float
    """Prompt processing time, which ends with the first token."""
    total_s: float
    drafted: int = 0
    accepted: int = 0


def find_programs(folder: str | None) -> dict[str, Path]:
    """Return {"plain": path, "speculative": path} for the llama.cpp programs found."""
    found: dict[str, Path] = {}

    def locate(name: str) -> Path | None:
        if folder:
            candidate = Path(folder).expanduser() / name
            return candidate if candidate.is_file() else None
        where = shutil.which(name)
        return Path(where) if where else None

    for name in PLAIN_PROGRAMS:
        if (path := locate(name)) is not None:
            found["plain"] = path
            break
    if (path := locate(SPECULATIVE_PROGRAM)) is not None:
        found["speculative"] = path
    return found


def parse_plain(log: str) -> LlamaCppResult:
    """Read the rate of a ``llama-completion`` run from its log; raise ValueError when absent."""
    rate = _EVAL_RATE.search(log)
    prompt = _PROMPT_EVAL.search(log)
    if rate is None:
        raise ValueError("no 'eval time' line in llama.cpp's output")
    runs, per_second = int(rate.group(1)), float(rate.group(2))
    first = float(prompt.group(1)) / 1000 if prompt else 0.0
    return LlamaCppResult(runs + 1, per_second, first, first + runs / per_second if per_second else first)


def parse_speculative(log: str) -> LlamaCppResult:
    """Read the rate and acceptance of a ``llama-speculative-simple`` run; raise ValueError when absent."""
    decoded = _DECODED.search(log)
    if decoded is None:
        raise ValueError("no 'decoded ... speed' line in llama.cpp's output")
    encoded = _ENCODED.search(log)
    drafted = _DRAFTED.search(log)
    accepted = _ACCEPTED.search(log)
    first = float(encoded.group(1)) if encoded else 0.0
    return LlamaCppResult(
        int(decoded.group(1)),
        float(decoded.group(3)),
        first,
        first + float(decoded.group(2)),
        int(drafted.group(1)) if drafted else 0,
        int(accepted.group(1)) if accepted else 0,
    )


def run_program(
    program: Path, target: Path, prompt_text: str, max_new_tokens: int, threads: int, draft: Path | None = None, draft_tokens: int = 4
) -> LlamaCppResult:
    """Run one greedy generation; raise RuntimeError with the program's last line when it fails."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as prompt_file:
        prompt_file.write(prompt_text)
        prompt_file.flush()
        command = [str(program), "-m", str(target), "-f", prompt_file.name, "-n", str(max_new_tokens)]
        command += ["-t", str(threads), "--temp", "0", "-c", "4096"]
        if draft is None:
            command.append("-no-cnv")
        else:
            command += ["-md", str(draft), "--spec-type", "draft-simple", "--spec-draft-n-max", str(draft_tokens)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{program.name} did not finish within {_TIMEOUT_S} s") from None
    log = done.stdout + done.stderr
    if done.returncode != 0:
        last = log.strip().splitlines()[-1] if log.strip() else "no output"
        raise RuntimeError(f"{program.name} exited with {done.returncode}: {last}")
    return parse_speculative(log) if draft is not None else parse_plain(log)
