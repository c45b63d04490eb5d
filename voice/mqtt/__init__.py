"""``voice mqtt``: the assistant as an MQTT service for home automation."""
