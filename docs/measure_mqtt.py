"""Compare a spoken turn over MQTT with the same turn through the respond path, interleaved in one process.

Run from the repository root (mosquitto must be installed; the script starts its own on
a free loopback port):

    .venv/bin/python docs/measure_mqtt.py [--output mqtt.json] [--limit N]

Each spoken fixture is answered twice in a row with a fresh conversation: once by
``Assistant.respond_to_audio`` as ``voice respond`` calls it, once as a ``voice/ask``
request with a WAV path and a reply file, served by ``MqttService``. Times run from the
request's arrival (MQTT) or from the start of reading the WAV (respond) to the first
verified text and the first audio. For MQTT it also prints the time from publishing the
request to receiving the first ``voice/answer/text`` message, broker hops included.
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
from tests.mqtt.conftest import Broker, Observer, ServiceThread  # noqa: E402
from voice.audio.sinks import WavFileSink  # noqa: E402
from voice.audio.wav import load_speech  # noqa: E402
from voice.config import Config, MqttConfig  # noqa: E402
from voice.mqtt.service import MqttService  # noqa: E402
from voice.pipeline import load_assistant  # noqa: E402


def respond_turn(assistant, wav: Path, reply: Path) -> dict:
    async def turn():
        started = time.perf_counter()
        audio = load_speech(wav)
        return await assistant.respond_to_audio(audio, WavFileSink(reply), started_at=started)

    result = asyncio.run(turn())
    return {"first_token_ms": result.metrics.first_token_ms, "first_audio_ms": result.metrics.first_audio_ms, "answer": result.answer}


def mqtt_turn(observer: Observer, wav: Path, reply: Path, request_id: str) -> dict:
    sent = time.perf_counter()
    observer.publish("voice/ask", {"id": request_id, "wav": str(wav), "output": str(reply), "speak": False})
    metrics = observer.wait_for_payload("voice/metrics", id=request_id, timeout=300)
    answer = observer.wait_for_payload("voice/answer", id=request_id)
    first = next(message for message in observer.on("voice/answer/text") if message.json()["id"] == request_id)
    return {
        "first_token_ms": metrics["first_token_ms"],
        "first_audio_ms": metrics["first_audio_ms"],
        "client_first_text_ms": round((first.at - sent) * 1000),
        "answer": answer["text"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="mqtt.json", help="JSON file for every turn")
    parser.add_argument("--limit", type=int, help="measure only the first N fixtures")
    args = parser.parse_args()

    config = Config()
    assistant = asyncio.run(load_assistant(config))
    turns = []
    with tempfile.TemporaryDirectory() as folder:
        broker = Broker(Path(folder))
        broker.start()
        mqtt = MqttConfig(host="127.0.0.1", port=broker.port, speaker=False, discovery=False)
        runner = ServiceThread(MqttService(assistant, Config(mqtt=mqtt)))
        observer = Observer(broker.port, client_id="measure-mqtt", topics=("voice/#",))
        observer.wait_for(lambda: observer.on("voice/status"), description="the service online")
        try:
            rows = fixtures_of_kind("question", "command")[: args.limit]
            for number, row in enumerate(rows):
                wav = FIXTURES / row["file"]
                # Alternate which path goes first, so neither always runs on a warmer cache.
                order = ("respond", "mqtt") if number % 2 == 0 else ("mqtt", "respond")
                for path in order:
                    assistant.llm.new_conversation()
                    runner.service.conversations.clear()
                    reply = Path(folder) / f"{path}-{number}.wav"
                    if path == "respond":
                        turn = respond_turn(assistant, wav, reply)
                    else:
                        turn = mqtt_turn(observer, wav, reply, f"measure-{number}")
                    turn.update(path=path, file=row["file"])
                    turns.append(turn)
                    extra = f", client first text {turn['client_first_text_ms']} ms" if path == "mqtt" else ""
                    print(f"{row['file']:42s} {path:8s} first token {turn['first_token_ms']} ms, first audio {turn['first_audio_ms']} ms{extra}", flush=True)
        finally:
            observer.close()
            runner.stop()
            broker.stop()

    print(f"\nmedians over {len(turns) // 2} fixtures")
    summary = {}
    for field in ("first_token_ms", "first_audio_ms", "client_first_text_ms"):
        values = {path: [turn[field] for turn in turns if turn["path"] == path and turn.get(field) is not None] for path in ("respond", "mqtt")}
        medians = {path: statistics.median(numbers) if numbers else None for path, numbers in values.items()}
        ratio = medians["mqtt"] / medians["respond"] if medians["mqtt"] and medians["respond"] else None
        summary[field] = {**medians, "mqtt_over_respond": ratio}
        cells = ["-" if value is None else f"{value:.0f}" for value in (medians["respond"], medians["mqtt"])]
        print(f"{field:22s} respond {cells[0]:>6s} ms   mqtt {cells[1]:>6s} ms   ratio {'-' if ratio is None else f'{ratio:.3f}'}")
    same = sum(a["answer"] == b["answer"] for a, b in zip(turns[::2], turns[1::2], strict=True))
    print(f"identical answers: {same} of {len(turns) // 2}")
    report = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(), "summary": summary, "turns": turns}
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
