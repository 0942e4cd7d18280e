"""m2m-bridge: legacy Modbus and serial equipment to MQTT."""

__version__ = "0.1.0"
