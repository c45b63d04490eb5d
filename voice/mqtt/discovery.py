"""Home Assistant MQTT discovery: the assistant as one device with six entities.

Home Assistant reads retained configs from ``<discovery_prefix>/<component>/<node>/<object>/config``.
Every entity reads the one retained JSON state topic, so a restarted Home Assistant shows
the last transcript and answer at once; all share the availability topic, which the
broker sets to ``offline`` through the last will when the service dies.
"""

from __future__ import annotations

import re
from importlib import metadata
from typing import Any

from voice.config import MqttConfig
from voice.mqtt.protocol import Topics

# Home Assistant rejects sensor states longer than this many characters.
MAX_STATE_CHARS = 255


def node_id(config: MqttConfig) -> str:
    """Return the client id reduced to the characters Home Assistant allows in a discovery topic."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", config.client_id)


def discovery_messages(config: MqttConfig, topics: Topics) -> list[tuple[str, dict[str, Any]]]:
    """Return (topic, config) for each entity."""
    node = node_id(config)
    try:
        version = metadata.version("voice")
    except metadata.PackageNotFoundError:
        version = "unknown"
    device = {
        "identifiers": [node],
        "name": config.device_name,
        "manufacturer": "voice",
        "model": "Offline voice assistant with speculative decoding",
        "sw_version": version,
    }
    common = {
        "availability_topic": topics.status,
        "payload_available": "online",
        "payload_not_available": "offline",
        "device": device,
        "has_entity_name": True,
    }
    site = config.site_ids[0]
    entities: list[tuple[str, str, dict[str, Any]]] = [
        ("sensor", "state", {"name": "State", "state_topic": topics.state, "value_template": "{{ value_json.state }}", "icon": "mdi:account-voice"}),
        ("sensor", "transcript", {"name": "Last transcript", "state_topic": topics.state, "value_template": "{{ value_json.transcript }}", "icon": "mdi:text-recognition"}),
        ("sensor", "answer", {"name": "Last answer", "state_topic": topics.state, "value_template": "{{ value_json.answer }}", "icon": "mdi:message-reply-text"}),
        (
            "sensor",
            "latency",
            {
                "name": "Latency",
                "state_topic": topics.state,
                "value_template": "{{ value_json.latency_ms }}",
                "unit_of_measurement": "ms",
                "device_class": "duration",
                "state_class": "measurement",
            },
        ),
        (
            "text",
            "ask",
            {
                "name": "Ask",
                "command_topic": topics.ask,
                # The text entity sends its raw value; the template wraps it in the JSON
                # request the ask topic expects.
                "command_template": '{"text": {{ value | tojson }}, "siteId": "' + site + '"}',
                "max": MAX_STATE_CHARS,
                "icon": "mdi:comment-question",
            },
        ),
        (
            "switch",
            "mute",
            {
                "name": "Mute",
                "command_topic": topics.mute_set,
                "state_topic": topics.state,
                "value_template": "{{ 'ON' if value_json.muted else 'OFF' }}",
                "payload_on": "ON",
                "payload_off": "OFF",
                "icon": "mdi:volume-off",
            },
        ),
    ]
    messages = []
    for component, name, entity in entities:
        payload = {**entity, **common, "unique_id": f"{node}_{name}", "object_id": f"{node}_{name}"}
        messages.append((f"{config.discovery_prefix}/{component}/{node}/{name}/config", payload))
    return messages


def status_topic(config: MqttConfig) -> str:
    """Return the topic where Home Assistant publishes ``online`` after it starts; discovery is sent again then."""
    return f"{config.discovery_prefix}/status"
