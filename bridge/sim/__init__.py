"""Simulated equipment for `simulate`, `demo` and the tests: tcp (Modbus TCP slaves), serial
(RTU/ASCII slaves and line instruments on ptys), run (both until SIGTERM), broker (an embedded
MQTT broker for the demo) and demo (devices -> bridge -> broker, with a live view)."""
