"""The pure core: no I/O, no asyncio (import-linter holds it to that).

codec (registers <-> values), planner (points -> read requests, refusal re-planning),
normalize (scale, deadband, on-change), messages (readings -> topics and payloads), outbox
(a poll's readings -> messages), writes (command checks and the write request), bustime
(serial line timing and bus load), backoff (the one back-off rule), homeassistant (discovery
documents), sparkplug and sparkplug_commands (Sparkplug B payloads, on the generated
sparkplug_pb2).
"""
