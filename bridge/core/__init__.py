"""The pure core: no I/O, no asyncio (import-linter holds it to that).

codec (registers <-> values), planner (points -> read requests), normalize (scale, deadband,
on-change), messages (readings -> topics and payloads), writes (command checks and the write
request), bustime (serial line timing), report (`plan` and bus load).
"""
