"""Time whole turns on the spoken fixtures, speculation on and off, interleaved in one process.

Run from the repository root:

    .venv/bin/python docs/measure_turns.py [--output turns.json] [--limit N]

Each fixture is answered twice in a row, once per mode, with a fresh conversation (the
cached system prompt stays, as in a running service). It prints one line per turn and a
median table, and writes every turn's metrics to the JSON file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import FIXTURES, fixtures_of_kind  # noqa: E402
from voice.audio.sinks import WavFileSink  # noqa: E402
from voice.audio.wav import load_speech  # noqa: E402
from voice.config import Config  # noqa: E402
from voice.pipeline import load_assistant  # noqa: E402

FIELDS = ["asr_ms", "first_token_ms", "first_audio_ms", "total_ms", "tokens_per_s", "acceptance_rate", "mean_accepted"]


async def measure(limit: int | None) -> list[dict]:
    started = time.monotonic()
    assistant = await load_assistant(Config())
    print(f"models ready in {time.monotonic() - started:.1f} s", flush=True)
    rows = fixtures_of_kind("question", "command", "followup")[:limit]
    turns = []
    with tempfile.TemporaryDirectory() as folder:
        for row in rows:
            audio = load_speech(FIXTURES / row["file"])
            for speculative in (True, False):
                assistant.llm.new_conversation()
                sink = WavFileSink(Path(folder) / "reply.wav")
                result = await assistant.respond_to_audio(audio, sink, speculative=speculative)
                metrics = result.metrics.as_dict()
                metrics.update(file=row["file"], transcript=result.transcript.text, answer=result.answer)
                turns.append(metrics)
                mode = "on " if speculative else "off"
                print(f"{row['file']:42s} speculation {mode} {result.metrics.summary()}", flush=True)
    return turns


def summarize(turns: list[dict]) -> None:
    print(f"\nmedians over {len(turns) // 2} fixtures")
    print(f"{'figure':18s} {'speculation on':>15s} {'speculation off':>16s}")
    for field in FIELDS:
        values = {}
        for mode in (True, False):
            numbers = [turn[field] for turn in turns if turn["speculative"] is mode and turn[field] is not None]
            values[mode] = statistics.median(numbers) if numbers else None
        shown = ["-" if value is None else f"{value:.2f}" for value in (values[True], values[False])]
        print(f"{field:18s} {shown[0]:>15s} {shown[1]:>16s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="turns.json", help="JSON file for every turn's metrics")
    parser.add_argument("--limit", type=int, help="measure only the first N fixtures")
    args = parser.parse_args()
    turns = asyncio.run(measure(args.limit))
    summarize(turns)
    report = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(), "turns": turns}
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
