"""The one place that turns configured links into transports and dispatches on link type.

A Modbus link (tcp, udp, rtu-over-tcp, rtu, ascii) becomes one shared `Link`: a pymodbus
client behind the one-transaction-at-a-time scheduler, with the line's quiet time. A `serial`
link carries ASCII lines, not Modbus: its instruments own their port (bridge.instrument).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

from bridge.config.frozen import is_line, is_serial
from bridge.core.bustime import silence
from bridge.errors import BridgeError
from bridge.transports.link import Link
from bridge.transports.modbus import Endpoint, ModbusClient

if TYPE_CHECKING:
    from bridge.config import Config, Device, LineLink, SerialLink, TcpLink

    ModbusLink: TypeAlias = TcpLink | SerialLink


def modbus_link(config: Config, device: Device) -> ModbusLink | None:
    """The device's link if it carries Modbus (registers to read and write), else None."""
    link = config.link(device.link)
    return None if is_line(link) else link


def line_link(config: Config, device: Device) -> LineLink | None:
    """The device's link if it is an ASCII line (an instrument that owns its port), else None."""
    link = config.link(device.link)
    return link if is_line(link) else None


def endpoint_for(link: ModbusLink) -> Endpoint:
    """The transport's view of a configured Modbus link."""
    if is_serial(link):
        return Endpoint(
            link.type, link.port, 0, link.timeout,
            baudrate=link.baudrate, parity=link.parity, stopbits=link.stopbits,
            bytesize=link.bytesize,
        )
    return Endpoint(link.type, link.host, link.port, link.timeout)


def link_silence(link: ModbusLink) -> float:
    """Quiet time after each transaction, plus any `request_delay`.

    On a serial line it is the serial-line spec's inter-frame gap (3.5 characters, 1.75 ms
    above 19200 baud). ASCII frames are delimited and would not strictly need it, but cheap
    ASCII slaves turn their transceivers around slowly, and it costs ~4 ms at 9600 baud. A TCP
    socket (rtu-over-tcp included) leaves the line timing to the serial server in front.
    """
    if is_serial(link):
        return silence(link.baudrate) + link.request_delay
    return link.request_delay


def build_links(config: Config) -> dict[str, Link]:
    """One shared client per Modbus link that a device uses."""
    links: dict[str, Link] = {}
    for device in config.devices:
        link = modbus_link(config, device)
        # Line instruments own their port (Service.line_ports); a shared link is built once.
        if link is not None and link.name not in links:
            links[link.name] = Link(ModbusClient(endpoint_for(link)), silence=link_silence(link))
    return links


def plan_for(config: Config, device: Device) -> tuple[int, int]:
    """(max_registers, max_gap) of the device's link."""
    link = modbus_link(config, device)
    if link is None:
        raise BridgeError(f"device {device.name!r}: link {device.link!r} is not a Modbus link")
    return link.max_registers, link.max_gap
