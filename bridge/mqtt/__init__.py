"""Northbound: the MQTT side of the bridge.

wire (our MQTT 5 client over the mqtt5 codec), session (one connection, MQTT 5 or 3.1.1),
publisher (reconnects, drains the buffer, statuses) and commands (`/set` to checked writes).
"""
