"""Northbound: the MQTT side of the bridge.

wire (our MQTT 5 client over the mqtt5 codec: wireproto its sans-IO state, wireevents what
that state reports, wirelink the asyncio protocol), session (one connection, MQTT 5 or 3.1.1),
publisher (one connection's life, coordinating: connection (reconnect, back-off, the `auto`
fallback; subscriptions and replies), delivery (buffer custody, live first, paced replay),
statuses (gateway and device status topics)), discovery (Home Assistant documents) and
commands (`/set` to checked writes).
"""
