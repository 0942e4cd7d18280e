"""The config loader: models, defaults, map merging, secrets and located errors."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.config import (
    Config,
    LineLink,
    TcpLink,
    config_json_schema,
    load_config,
    parse_duration,
    parse_size,
)
from bridge.errors import ConfigError, ConfigIssue

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# Lines 1-5 of most files below; a device list starts on line 6.
LINKS = """\
version: 1
links:
  - {name: net, type: tcp, host: 127.0.0.1}
  - {name: line, type: serial, port: /dev/ttyUSB1}
"""
HEAD = LINKS + "devices:\n"


def write(tmp_path: Path, text: str, name: str = "bridge.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    return load_config(write(tmp_path, text), environ=environ or {})


def issues(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, environ)
    return caught.value.issues


def only_issue(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> ConfigIssue:
    found = issues(tmp_path, text, environ)
    assert len(found) == 1, found
    return found[0]


def device_with(point: str) -> str:
    """HEAD plus one Modbus device whose only point (on line 9) is `point`."""
    return HEAD + f"  - name: d\n    link: net\n    points:\n      - {point}\n"


class TestLocatedErrors:
    """Every rule yields one issue naming the file, the line and the key."""

    def test_unknown_key_is_reported_with_its_line(self, tmp_path: Path) -> None:
        """A misspelt key names itself and its line."""
        issue = only_issue(tmp_path, device_with("{name: p, adress: 3}"))
        assert (issue.line, issue.path) == (9, "devices[0].points[0].adress")
        assert issue.message == "unknown key 'adress'"
        assert str(issue).startswith(f"{tmp_path / 'bridge.yaml'}:9: devices[0].points[0].adress")

    def test_wrong_type_keeps_pydantics_message_without_url(self, tmp_path: Path) -> None:
        """A string where a number belongs says what was expected, with no URL."""
        issue = only_issue(tmp_path, LINKS.replace("127.0.0.1}", "127.0.0.1, port: web}"))
        assert (issue.line, issue.path) == (3, "links[0].port")
        assert issue.message == "expected an integer, not the text 'web': drop the quotes"
        assert "http" not in issue.message

    def test_literal_error_lists_the_choices(self, tmp_path: Path) -> None:
        """An unknown point type is shown with the types that exist."""
        issue = only_issue(tmp_path, device_with("{name: p, address: 0, type: int33}"))
        assert issue.line == 9
        assert issue.path == "devices[0].points[0].type"
        assert issue.message.startswith("'int33' is not one of 'bool', 'int16'")

    def test_unknown_link_type_is_reported_at_type(self, tmp_path: Path) -> None:
        """A link type outside the union names the `type` key, not pydantic's tag."""
        issue = only_issue(tmp_path, LINKS.replace("type: serial", "type: serail"))
        assert (issue.line, issue.path) == (4, "links[1].type")
        assert "'serail' is not one of 'tcp'" in issue.message

    def test_missing_key_is_reported_at_its_parent(self, tmp_path: Path) -> None:
        """A device without a link is reported at the device's line."""
        issue = only_issue(tmp_path, HEAD + "  - name: d\n")
        assert (issue.line, issue.path, issue.message) == (
            6,
            "devices[0].link",
            "required key missing",
        )

    def test_version_other_than_1_is_refused(self, tmp_path: Path) -> None:
        """Only format version 1 is understood."""
        issue = only_issue(tmp_path, LINKS.replace("version: 1", "version: 2"))
        assert (issue.line, issue.path) == (1, "version")
        assert issue.message == "2 is not one of 1"

    def test_duplicate_link_names_are_refused(self, tmp_path: Path) -> None:
        """A second link of one name is reported where it stands."""
        issue = only_issue(tmp_path, LINKS.replace("name: line", "name: net"))
        assert (issue.line, issue.path) == (4, "links[1].name")
        assert issue.message == "duplicate name 'net' (first at line 3)"

    def test_duplicate_device_names_are_refused(self, tmp_path: Path) -> None:
        """A second device of one name is reported at its own line."""
        text = HEAD + "  - {name: d, link: net}\n  - {name: d, link: net}\n"
        issue = only_issue(tmp_path, text)
        assert (issue.line, issue.path) == (7, "devices[1].name")
        assert "duplicate name 'd'" in issue.message

    def test_duplicate_point_names_in_a_device_are_refused(self, tmp_path: Path) -> None:
        """Two points of one name in a device's list is an error at the second."""
        text = device_with("{name: p, address: 0}") + "      - {name: p, address: 1}\n"
        issue = only_issue(tmp_path, text)
        assert (issue.line, issue.path) == (10, "devices[0].points[1].name")
        assert issue.message == "duplicate name 'p' (first at line 9)"

    def test_duplicate_point_is_found_in_a_device_that_fails_otherwise(
        self, tmp_path: Path
    ) -> None:
        """One bad point does not hide that two others share a name."""
        text = device_with("{name: p, address: 0}") + (
            "      - {name: p, address: 1}\n      - {name: q, address: 2, type: int33}\n"
        )
        paths = {issue.path for issue in issues(tmp_path, text)}
        assert paths == {"devices[0].points[1].name", "devices[0].points[2].type"}

    def test_device_naming_an_unknown_link_is_refused(self, tmp_path: Path) -> None:
        """The `link` key is reported with the name it gave."""
        issue = only_issue(tmp_path, HEAD + "  - name: d\n    link: nett\n")
        assert (issue.line, issue.path, issue.message) == (
            7,
            "devices[0].link",
            "unknown link 'nett' (links are: 'net', 'line')",
        )

    def test_unknown_link_says_when_there_are_none(self, tmp_path: Path) -> None:
        """With no links at all, the message says so rather than listing nothing."""
        issue = only_issue(tmp_path, "version: 1\ndevices:\n  - {name: d, link: net}\n")
        assert issue.message == "unknown link 'net' (no links are defined)"

    def test_line_device_needs_a_response(self, tmp_path: Path) -> None:
        """A device on a serial (line) link cannot parse anything without `response`."""
        issue = only_issue(tmp_path, HEAD + "  - name: scale\n    link: line\n")
        assert (issue.line, issue.path) == (6, "devices[0].response")
        assert "required" in issue.message

    def test_writable_line_instrument_point_is_refused(self, tmp_path: Path) -> None:
        """A line instrument is only read: a writable point there is a mistake."""
        text = HEAD + (
            "  - name: s\n    link: line\n    response: '(?P<w>\\d+)'\n"
            "    points:\n      - {name: w, writable: true}\n"
        )
        issue = only_issue(tmp_path, text)
        assert (issue.line, issue.path) == (10, "devices[0].points[0].writable")
        assert "read-only" in issue.message

    def test_modbus_device_with_a_response_is_refused(self, tmp_path: Path) -> None:
        """`response` is meaningless on a Modbus link."""
        issue = only_issue(tmp_path, HEAD + "  - name: d\n    link: net\n    response: x\n")
        assert (issue.line, issue.path) == (8, "devices[0].response")
        assert "tcp" in issue.message

    def test_response_group_without_a_point_is_refused(self, tmp_path: Path) -> None:
        """Each named group of `response` must name a point."""
        text = HEAD + "  - name: s\n    link: line\n    response: '(?P<weight>\\d+)'\n"
        issue = only_issue(tmp_path, text)
        assert (issue.line, issue.path) == (8, "devices[0].response")
        assert issue.message == "named group 'weight' matches no point"

    def test_response_that_is_not_a_regex_is_refused(self, tmp_path: Path) -> None:
        """A response pattern must compile."""
        text = HEAD + "  - name: s\n    link: line\n    response: '(?P<w>'\n"
        issue = only_issue(tmp_path, text)
        assert (issue.line, issue.path) == (8, "devices[0].response")
        assert issue.message.startswith("not a valid regular expression")

    def test_address_past_the_table_end_is_refused(self, tmp_path: Path) -> None:
        """A float32 at 65535 would need register 65536."""
        issue = only_issue(tmp_path, device_with("{name: p, address: 65535, type: float32}"))
        assert (issue.line, issue.path) == (9, "devices[0].points[0].address")
        assert "past 65535" in issue.message

    def test_last_register_65535_is_accepted(self, tmp_path: Path) -> None:
        """A float32 at 65534 ends exactly at the last register."""
        config = load(tmp_path, device_with("{name: p, address: 65534, type: float32}"))
        assert config.devices[0].points[0].address == 65534

    @pytest.mark.parametrize("bit", [-1, 16])
    def test_bit_outside_0_to_15_is_refused(self, tmp_path: Path, bit: int) -> None:
        """A register has bits 0 to 15."""
        issue = only_issue(
            tmp_path, device_with(f"{{name: p, address: 0, type: bool, bit: {bit}}}")
        )
        assert (issue.line, issue.path) == (9, "devices[0].points[0].bit")

    def test_bit_on_a_32_bit_type_is_refused(self, tmp_path: Path) -> None:
        """Bits are taken from one 16-bit register only."""
        issue = only_issue(tmp_path, device_with("{name: p, address: 0, type: float32, bit: 2}"))
        assert (issue.line, issue.path) == (9, "devices[0].points[0].bit")
        assert "float32" in issue.message

    def test_bit_on_a_coil_is_refused(self, tmp_path: Path) -> None:
        """Coils are single bits already."""
        issue = only_issue(tmp_path, device_with("{name: p, address: 0, table: coil, bit: 2}"))
        assert (issue.line, issue.path) == (9, "devices[0].points[0].bit")
        assert "holding and input" in issue.message

    @pytest.mark.parametrize("type_", ["bool", "int16", "uint16"])
    def test_bit_on_a_16_bit_type_is_accepted(self, tmp_path: Path, type_: str) -> None:
        """bool, int16 and uint16 points may pick one bit of their register."""
        config = load(tmp_path, device_with(f"{{name: p, address: 0, type: {type_}, bit: 15}}"))
        assert config.devices[0].points[0].bit == 15

    def test_string_without_count_is_refused(self, tmp_path: Path) -> None:
        """A string's length in registers must be given."""
        issue = only_issue(tmp_path, device_with("{name: p, address: 0, type: string}"))
        assert (issue.line, issue.path) == (9, "devices[0].points[0].count")
        assert "required for type string" in issue.message

    def test_count_on_a_number_is_refused(self, tmp_path: Path) -> None:
        """A number's width comes from its type, never from count."""
        issue = only_issue(tmp_path, device_with("{name: p, address: 0, type: int32, count: 2}"))
        assert (issue.line, issue.path) == (9, "devices[0].points[0].count")
        assert "only for strings" in issue.message

    def test_string_longer_than_one_request_is_refused(self, tmp_path: Path) -> None:
        """A string must fit one read request: 125 registers at most."""
        issue = only_issue(
            tmp_path, device_with("{name: p, address: 0, type: string, count: 126}")
        )
        assert (issue.line, issue.path) == (9, "devices[0].points[0].count")
        assert "125" in issue.message

    def test_writable_bit_is_refused(self, tmp_path: Path) -> None:
        """One bit cannot be written without rewriting its 15 neighbours."""
        issue = only_issue(
            tmp_path, device_with("{name: p, address: 0, type: bool, bit: 2, writable: true}")
        )
        assert (issue.line, issue.path) == (9, "devices[0].points[0].writable")
        assert "single bit" in issue.message

    def test_point_named_status_is_refused(self, tmp_path: Path) -> None:
        """A point called status would publish on the device's status topic."""
        issue = only_issue(tmp_path, device_with("{name: status, address: 0}"))
        assert (issue.line, issue.path) == (9, "devices[0].points[0].name")
        assert "reserved" in issue.message

    @pytest.mark.parametrize("table", ["input", "discrete"])
    def test_writable_read_only_table_is_refused(self, tmp_path: Path, table: str) -> None:
        """Input registers and discrete inputs cannot be written."""
        issue = only_issue(
            tmp_path, device_with(f"{{name: p, address: 0, table: {table}, writable: true}}")
        )
        assert (issue.line, issue.path) == (9, "devices[0].points[0].writable")
        assert "read-only" in issue.message

    def test_min_above_max_is_refused(self, tmp_path: Path) -> None:
        """An empty range would refuse every write."""
        issue = only_issue(tmp_path, device_with("{name: p, address: 0, min: 10, max: 5}"))
        assert (issue.line, issue.path) == (9, "devices[0].points[0].max")
        assert issue.message == "max 5 is below min 10"

    def test_values_on_a_float_is_refused(self, tmp_path: Path) -> None:
        """An enum map only makes sense for integers."""
        issue = only_issue(
            tmp_path, device_with("{name: p, address: 0, type: float32, values: {0: stopped}}")
        )
        assert (issue.line, issue.path) == (9, "devices[0].points[0].values")
        assert "integer type" in issue.message

    def test_modbus_point_without_address_is_refused(self, tmp_path: Path) -> None:
        """Points of a Modbus device must say where they are."""
        issue = only_issue(tmp_path, device_with("{name: p}"))
        assert (issue.line, issue.path) == (9, "devices[0].points[0].address")
        assert "required" in issue.message

    @pytest.mark.parametrize(
        ("text", "line", "path"),
        [
            (LINKS.replace("version: 1", "version: 1\ngateway: {id: gw/1}"), 2, "gateway.id"),
            (HEAD + "  - {name: meter 1, link: net}\n", 6, "devices[0].name"),
            (device_with("{name: p.q, address: 0}"), 9, "devices[0].points[0].name"),
        ],
    )
    def test_names_outside_the_topic_alphabet_are_refused(
        self, tmp_path: Path, text: str, line: int, path: str
    ) -> None:
        """Gateway ids, device and point names become topic segments: [A-Za-z0-9_-] only."""
        issue = only_issue(tmp_path, text)
        assert (issue.line, issue.path) == (line, path)
        assert "may only contain [A-Za-z0-9_-]" in issue.message

    def test_duplicate_yaml_keys_are_refused(self, tmp_path: Path) -> None:
        """YAML would silently keep the last value; we say so instead."""
        issue = only_issue(tmp_path, HEAD + "  - name: d\n    link: net\n    link: net\n")
        assert (issue.line, issue.path) == (8, "devices[0].link")
        assert issue.message == "duplicate key 'link' (first at line 7)"

    def test_yaml_syntax_error_names_its_line(self, tmp_path: Path) -> None:
        """Broken YAML gives one issue at the line of the problem."""
        issue = only_issue(tmp_path, "version: 1\nlinks:\n  - {name: net\n")
        assert issue.line == 4
        assert issue.message.startswith("invalid YAML")

    def test_unreadable_main_file_is_one_issue(self, tmp_path: Path) -> None:
        """A missing file is a ConfigError, not an OSError."""
        with pytest.raises(ConfigError, match="cannot read"):
            load_config(tmp_path / "absent.yaml", environ={})

    @pytest.mark.timeout(20)
    def test_a_config_that_is_a_fifo_or_too_large_is_one_issue(self, tmp_path: Path) -> None:
        """Refused before reading: a FIFO would block, 16 MiB of YAML would parse for minutes."""
        fifo = tmp_path / "fifo.yaml"
        os.mkfifo(fifo)
        with pytest.raises(ConfigError) as caught:
            load_config(fifo, environ={})
        assert str(caught.value) == f"{fifo}: cannot read: not a regular file (a FIFO or a device?)"
        big = tmp_path / "big.yaml"
        with big.open("wb") as file:
            file.truncate(16 * 2**20 + 1)
        with pytest.raises(ConfigError) as caught:
            load_config(big, environ={})
        assert str(caught.value) == f"{big}: cannot read: larger than 16 MiB"

    def test_all_errors_are_reported_at_once(self, tmp_path: Path) -> None:
        """Three problems in different places give three issues, in line order."""
        text = HEAD.replace("127.0.0.1}", "127.0.0.1, port: web}") + (
            "  - name: d\n    link: nett\n    points:\n      - {name: p, address: 0, type: int33}\n"
        )
        found = issues(tmp_path, text)
        assert [(i.line, i.path) for i in found] == [
            (3, "links[0].port"),
            (7, "devices[0].link"),
            (9, "devices[0].points[0].type"),
        ]


class TestMaps:
    """Map files: loading, merging, and their own located errors."""

    MAP = """\
    byte_order: CDAB
    points:
      - {name: a, table: input, address: 0, type: float32}
      - {name: b, address: 2}
      - {name: c, address: 3}
    """

    def test_device_points_override_map_points_in_place(self, tmp_path: Path) -> None:
        """Map points come first in map order; a same-named device point replaces its twin."""
        write(tmp_path, self.MAP, "m.yaml")
        text = HEAD + (
            "  - name: d\n    link: net\n    map: m.yaml\n    points:\n"
            "      - {name: z, address: 9}\n      - {name: b, address: 5, type: int16}\n"
        )
        device = load(tmp_path, text).devices[0]
        assert [(p.name, p.address) for p in device.points] == [
            ("a", 0),
            ("b", 5),
            ("c", 3),
            ("z", 9),
        ]
        assert device.map == "m.yaml"

    def test_byte_order_precedence_is_point_device_map_default(self, tmp_path: Path) -> None:
        """A point's own order wins, then the device's, then the map's, then ABCD."""
        write(tmp_path, self.MAP, "m.yaml")
        text = HEAD + (
            "  - {name: own, link: net, map: m.yaml, byte_order: BADC, points: "
            "[{name: a, address: 0, type: float32, byte_order: DCBA}]}\n"
            "  - {name: dev, link: net, map: m.yaml, byte_order: BADC}\n"
            "  - {name: map, link: net, map: m.yaml}\n"
            "  - {name: none, link: net, points: [{name: a, address: 0}]}\n"
        )
        orders = {d.name: d.points[0].byte_order for d in load(tmp_path, text).devices}
        assert orders == {"own": "DCBA", "dev": "BADC", "map": "CDAB", "none": "ABCD"}

    def test_map_path_is_relative_to_the_naming_file(self, tmp_path: Path) -> None:
        """`map: maps/x.yaml` is found next to the config, wherever the process runs."""
        (tmp_path / "maps").mkdir()
        write(tmp_path, self.MAP, "maps/x.yaml")
        config = load(tmp_path, HEAD + "  - {name: d, link: net, map: maps/x.yaml}\n")
        assert len(config.devices[0].points) == 3

    def test_missing_map_is_reported_at_the_map_key(self, tmp_path: Path) -> None:
        """The device line that names a missing map is where the problem is."""
        issue = only_issue(tmp_path, HEAD + "  - name: d\n    link: net\n    map: nope.yaml\n")
        assert (issue.line, issue.path) == (8, "devices[0].map")
        assert issue.message.startswith("cannot read map file 'nope.yaml'")

    def test_map_that_is_not_yaml_is_reported_in_the_map(self, tmp_path: Path) -> None:
        """A syntax error in a map names the map file and its line."""
        write(tmp_path, "points:\n  - {name: a\n", "m.yaml")
        issue = only_issue(tmp_path, HEAD + "  - {name: d, link: net, map: m.yaml}\n")
        assert issue.file == str(tmp_path / "m.yaml")
        assert issue.line == 3
        assert "invalid YAML" in issue.message

    def test_map_that_is_not_a_mapping_is_refused(self, tmp_path: Path) -> None:
        """A map file holds a mapping with points, not a bare list."""
        write(tmp_path, "- {name: a, address: 0}\n", "m.yaml")
        issue = only_issue(tmp_path, HEAD + "  - {name: d, link: net, map: m.yaml}\n")
        assert (issue.file, issue.line) == (str(tmp_path / "m.yaml"), 1)
        assert issue.message == "expected a mapping of keys"

    def test_error_in_a_map_names_the_map_file_and_line(self, tmp_path: Path) -> None:
        """Map errors use the map's own path and line, and are reported once per map."""
        write(
            tmp_path, "points:\n  - {name: a, address: 0}\n  - {name: b, type: int33}\n", "m.yaml"
        )
        text = (
            HEAD
            + "  - {name: d1, link: net, map: m.yaml}\n  - {name: d2, link: net, map: m.yaml}\n"
        )
        issue = only_issue(tmp_path, text)
        assert (issue.file, issue.line, issue.path) == (
            str(tmp_path / "m.yaml"),
            3,
            "points[1].type",
        )

    def test_map_point_without_address_is_reported_in_the_map(self, tmp_path: Path) -> None:
        """A Modbus device using a map point with no address points at the map's line."""
        write(tmp_path, "points:\n  - {name: a, address: 0}\n  - {name: b}\n", "m.yaml")
        issue = only_issue(tmp_path, HEAD + "  - {name: d, link: net, map: m.yaml}\n")
        assert (issue.file, issue.line, issue.path) == (
            str(tmp_path / "m.yaml"),
            3,
            "points[1].address",
        )

    def test_duplicate_points_in_a_map_are_refused(self, tmp_path: Path) -> None:
        """Two points of one name within a map is an error in the map."""
        write(tmp_path, "points:\n  - {name: a, address: 0}\n  - {name: a, address: 1}\n", "m.yaml")
        issue = only_issue(tmp_path, HEAD + "  - {name: d, link: net, map: m.yaml}\n")
        assert (issue.line, issue.path) == (3, "points[1].name")


class TestDefaults:
    """What an omitted key means."""

    def test_type_defaults_by_table(self, tmp_path: Path) -> None:
        """Registers default to uint16, coils and discrete inputs to bool."""
        text = device_with("{name: h, address: 0}") + (
            "      - {name: c, table: coil, address: 0}\n"
            "      - {name: i, table: discrete, address: 0}\n"
        )
        points = load(tmp_path, text).devices[0].points
        assert [(p.type, p.size, p.order) for p in points] == [
            ("uint16", 1, "ABCD"),
            ("bool", 1, "ABCD"),
            ("bool", 1, "ABCD"),
        ]

    def test_mqtt_defaults_follow_the_gateway_id(self, tmp_path: Path) -> None:
        """client_id and topic_prefix derive from gateway.id; port is 1883 without TLS."""
        config = load(tmp_path, "version: 1\ngateway: {id: gw-7}\n")
        assert (config.mqtt.client_id, config.mqtt.topic_prefix) == ("m2m-bridge-gw-7", "m2m/gw-7")
        assert (config.mqtt.host, config.mqtt.port) == ("localhost", 1883)
        assert config.mqtt.protocol == "auto"  # MQTT 5, else 3.1.1
        assert config.mqtt.buffer.max_bytes == 256 * 2**20
        assert config.mqtt.buffer.max_age == 7 * 86400

    def test_tls_turns_the_default_port_to_8883(self, tmp_path: Path) -> None:
        """`tls: {}` means TLS with system CAs, on the TLS port."""
        config = load(tmp_path, "version: 1\nmqtt: {tls: {}}\n")
        assert config.mqtt.tls is not None
        assert config.mqtt.port == 8883

    def test_gateway_id_defaults_to_a_clean_hostname(self, tmp_path: Path) -> None:
        """Without an id, the hostname is used, with characters topics refuse replaced."""
        gateway_id = load(tmp_path, "version: 1\n").gateway.id
        assert gateway_id
        assert all(c.isalnum() or c in "_-" for c in gateway_id)

    def test_state_dir_comes_from_systemd(self, tmp_path: Path) -> None:
        """$STATE_DIRECTORY (systemd StateDirectory=) wins over ./state."""
        config = load(tmp_path, "version: 1\n", {"STATE_DIRECTORY": "/var/lib/m2m-bridge"})
        assert config.gateway.state_dir == "/var/lib/m2m-bridge"
        assert load(tmp_path, "version: 1\n").gateway.state_dir == str(tmp_path / "state")

    def test_protocol_311_may_be_written_unquoted(self, tmp_path: Path) -> None:
        """YAML reads 3.1.1 as a string, which is the value the model expects."""
        assert load(tmp_path, "version: 1\nmqtt: {protocol: 3.1.1}\n").mqtt.protocol == "3.1.1"

    def test_link_and_device_lookups(self, tmp_path: Path) -> None:
        """Config.link and Config.device find by name and raise KeyError otherwise."""
        config = load(
            tmp_path,
            HEAD + "  - {name: s, link: line, response: '(?P<w>.)', points: [{name: w}]}\n",
        )
        assert isinstance(config.link("net"), TcpLink)
        assert isinstance(config.link("line"), LineLink)
        assert config.device("s").link == "line"
        net = config.link("net")
        assert isinstance(net, TcpLink)
        assert net.max_registers == 125
        with pytest.raises(KeyError):
            config.device("nope")


class TestDurationsAndSizes:
    """The human-friendly units of durations and sizes."""

    @pytest.mark.parametrize(
        ("text", "seconds"),
        [
            ("250ms", 0.25),
            ("5s", 5),
            ("1m", 60),
            ("1h", 3600),
            ("7d", 604800),
            (3, 3.0),
            (0.5, 0.5),
            ("2", 2.0),
            ("1.5s", 1.5),
            ("0ms", 0),
        ],
    )
    def test_durations_parse_to_seconds(self, text: str | float, seconds: float) -> None:
        """Each unit converts to float seconds."""
        assert parse_duration(text) == seconds

    @pytest.mark.parametrize("text", ["5 sec", "-1s", "s", "", "1w", True, -3])
    def test_bad_durations_are_refused(self, text: str | int) -> None:
        """Anything else is a ValueError with the accepted forms."""
        with pytest.raises(ValueError, match="250ms"):
            parse_duration(text)

    @given(st.integers(min_value=0, max_value=10**12))
    def test_milliseconds_are_exact(self, n: int) -> None:
        """`{n}ms` is exactly n / 1000 seconds."""
        assert parse_duration(f"{n}ms") == n / 1000

    @pytest.mark.parametrize(
        ("text", "size"),
        [
            ("256MiB", 256 * 2**20),
            ("64KiB", 65536),
            ("1GiB", 2**30),
            ("10MB", 10**7),
            (4096, 4096),
            ("100", 100),
            ("12B", 12),
        ],
    )
    def test_sizes_parse_to_bytes(self, text: str | int, size: int) -> None:
        """Binary and decimal units convert to int bytes."""
        assert parse_size(text) == size

    @pytest.mark.parametrize("text", ["1.5GiB", "10 bytes", "-1", "MiB"])
    def test_bad_sizes_are_refused(self, text: str) -> None:
        """Anything else is a ValueError."""
        with pytest.raises(ValueError, match="256MiB"):
            parse_size(text)

    def test_bad_duration_in_a_file_is_located(self, tmp_path: Path) -> None:
        """A duration the parser refuses is reported at its key."""
        issue = only_issue(tmp_path, "version: 1\nmqtt:\n  keepalive: soon\n")
        assert (issue.line, issue.path) == (3, "mqtt.keepalive")
        assert "250ms" in issue.message


class TestStrictTypes:
    """YAML's own typing is what the integrator wrote: text is not a number or a boolean."""

    @pytest.mark.parametrize(
        ("point", "key", "wanted"),
        [
            ('{name: p, address: "14"}', "address", "an integer"),
            ('{name: p, address: 1, scale: "0.1"}', "scale", "a number"),
            ('{name: p, address: 1, writable: "yes"}', "writable", "true or false"),
            ('{name: p, address: 1, type: string, count: "4"}', "count", "an integer"),
        ],
    )
    def test_quoted_numbers_and_booleans_are_refused(
        self, tmp_path: Path, point: str, key: str, wanted: str
    ) -> None:
        """Each names its path and says to drop the quotes."""
        issue = only_issue(tmp_path, device_with(point))
        assert (issue.line, issue.path) == (9, f"devices[0].points[0].{key}")
        assert issue.message.startswith(f"expected {wanted}, not the text ")
        assert issue.message.endswith("drop the quotes")

    def test_quoted_unit_is_refused(self, tmp_path: Path) -> None:
        """A device's unit id given as text is an error at `unit`."""
        issue = only_issue(tmp_path, HEAD + '  - {name: d, link: net, unit: "2"}\n')
        assert (issue.line, issue.path) == (6, "devices[0].unit")

    def test_schema_and_loader_agree_on_integers(self, tmp_path: Path) -> None:
        """What `schema` calls an integer, the loader refuses as text."""
        point = config_json_schema()["$defs"]["Point"]["properties"]["address"]
        assert {"type": "integer", "minimum": 0, "maximum": 65535} in point["anyOf"]
        assert only_issue(tmp_path, device_with('{name: p, address: "3"}'))

    def test_unquoted_on_off_in_values_says_to_quote_them(self, tmp_path: Path) -> None:
        """YAML 1.1 reads on/off as booleans; the message says what happened."""
        found = issues(tmp_path, device_with("{name: p, address: 1, values: {0: off, 1: on}}"))
        assert [issue.path for issue in found] == [
            "devices[0].points[0].values[0]",
            "devices[0].points[0].values[1]",
        ]
        assert found[0].message == (
            "YAML read an unquoted on/off/yes/no here as false: quote the word, e.g. 'off'"
        )

    def test_a_tab_says_yaml_needs_spaces(self, tmp_path: Path) -> None:
        """A tab in the indentation is the commonest first YAML mistake."""
        issue = only_issue(tmp_path, "version: 1\nmqtt:\n\thost: x\n")
        assert issue.line == 3
        assert issue.message.endswith("(YAML indents with spaces, never tabs)")

    def test_numbers_from_secrets_are_typed_as_yaml_would(self, tmp_path: Path) -> None:
        """A reference always yields text, so where a number belongs it is read as YAML."""
        text = 'version: 1\nmqtt: {port: "${env:P}", retain: "${env:R}", password: "${env:W}"}\n'
        mqtt = load(tmp_path, text, {"P": "1884", "R": "true", "W": "12345"}).mqtt
        assert (mqtt.port, mqtt.retain) == (1884, True)
        assert mqtt.password is not None
        assert mqtt.password.get_secret_value() == "12345"  # a string field stays text

    def test_a_secret_that_is_not_a_number_is_refused_without_its_value(
        self, tmp_path: Path
    ) -> None:
        """The message says a number was wanted, never what the secret held."""
        text = 'version: 1\nmqtt: {port: "${env:P}"}\n'
        issue = only_issue(tmp_path, text, {"P": "hunter2"})
        assert issue.path == "mqtt.port"
        assert "hunter2" not in str(issue)
        assert issue.message == "expected an integer; the secret's value is not one"


class TestModiconWarnings:
    """High addresses are legal but usually Modicon numbering: a warning, not an error."""

    def test_holding_40015_warns_with_the_likely_address(self, tmp_path: Path) -> None:
        """The warning names the point's line and the 0-based address it probably means."""
        config = load(tmp_path, device_with("{name: p, address: 40015}"))
        (warning,) = config.warnings
        assert (warning.line, warning.path) == (9, "devices[0].points[0].address")
        assert "Modicon numbering? holding 40015 is usually address 14" in warning.message

    def test_input_30010_warns_and_low_addresses_do_not(self, tmp_path: Path) -> None:
        """Input registers count from 30001; ordinary addresses and coils give no warning."""
        text = device_with("{name: p, table: input, address: 30010}") + (
            "      - {name: q, address: 100}\n      - {name: c, table: coil, address: 40001}\n"
        )
        (warning,) = load(tmp_path, text).warnings
        assert "input 30010 is usually address 9" in warning.message

    def test_a_map_shared_by_two_devices_warns_once(self, tmp_path: Path) -> None:
        """The warning is located in the map file, once."""
        write(tmp_path, "points:\n  - {name: p, address: 40001}\n", "m.yaml")
        text = HEAD + "".join(f"  - {{name: {n}, link: net, map: m.yaml}}\n" for n in "ab")
        (warning,) = load(tmp_path, text).warnings
        assert (warning.file, warning.line) == (str(tmp_path / "m.yaml"), 2)


class TestStateDir:
    """Where the buffer lives is checked before anything runs."""

    def test_relative_state_dir_is_relative_to_the_config_file(self, tmp_path: Path) -> None:
        """As map paths are: the daemon's working directory is / under systemd."""
        text = "version: 1\ngateway: {state_dir: var/buffer}\n"
        assert load(tmp_path, text).gateway.state_dir == str(tmp_path / "var" / "buffer")

    def test_checked_state_dir_is_created(self, tmp_path: Path) -> None:
        """`validate` and `run` create it, as the buffer would."""
        path = write(tmp_path, "version: 1\ngateway: {state_dir: a/b}\n")
        load_config(path, environ={}, check_state_dir=True)
        assert (tmp_path / "a" / "b").is_dir()
        assert list((tmp_path / "a" / "b").iterdir()) == []  # the write test leaves nothing

    @pytest.mark.parametrize(
        ("state_dir", "reason"),
        [
            ("/proc/nope", "No such file or directory"),
            ("bridge.yaml/sub", "not a directory"),
        ],
    )
    def test_unusable_state_dir_is_one_located_issue(
        self, tmp_path: Path, state_dir: str, reason: str
    ) -> None:
        """The issue names the path and the reason, at the key's line."""
        path = write(tmp_path, f"version: 1\ngateway:\n  state_dir: {state_dir}\n")
        with pytest.raises(ConfigError) as caught:
            load_config(path, environ={}, check_state_dir=True)
        (issue,) = caught.value.issues
        assert (issue.line, issue.path) == (3, "gateway.state_dir")
        assert issue.message.startswith("cannot use '")
        assert reason in issue.message
        load_config(path, environ={})  # one-off commands do not need the state dir

    def test_state_directory_from_systemd_is_named_as_the_source(self, tmp_path: Path) -> None:
        """A default nobody wrote in the file says where it came from."""
        path = write(tmp_path, "version: 1\n")
        with pytest.raises(ConfigError) as caught:
            load_config(path, environ={"STATE_DIRECTORY": "/proc/x"}, check_state_dir=True)
        assert "'/proc/x' ($STATE_DIRECTORY)" in str(caught.value)


class TestSecrets:
    """`${env:…}`, `${file:…}` and `${credential:…}` references."""

    def test_env_file_and_credential_are_substituted(self, tmp_path: Path) -> None:
        """Each source resolves; a file's one trailing newline is dropped."""
        (tmp_path / "pw").write_text("s3cret\n")
        (tmp_path / "creds").mkdir()
        (tmp_path / "creds" / "host").write_text("broker.example\n")
        text = (
            "version: 1\nmqtt:\n  username: ${env:MQTT_USER}\n"
            f"  password: ${{file:{tmp_path / 'pw'}}}\n  host: ${{credential:host}}\n"
            "  topic_prefix: site/${env:MQTT_USER}\n"
        )
        environ = {"MQTT_USER": "bridge", "CREDENTIALS_DIRECTORY": str(tmp_path / "creds")}
        mqtt = load(tmp_path, text, environ).mqtt
        assert mqtt.username == "bridge"
        assert mqtt.password is not None
        assert mqtt.password.get_secret_value() == "s3cret"
        assert mqtt.host == "broker.example"
        assert mqtt.topic_prefix == "site/bridge"
        assert "s3cret" not in repr(mqtt)

    @pytest.mark.parametrize(
        ("reference", "environ"),
        [
            ("${env:MQTT_PASS}", {}),
            ("${file:/nonexistent/pw}", {}),
            ("${credential:mqtt_password}", {}),
            ("${credential:mqtt_password}", {"CREDENTIALS_DIRECTORY": "/nonexistent"}),
        ],
    )
    def test_missing_secret_is_reported_by_reference(
        self, tmp_path: Path, reference: str, environ: dict[str, str]
    ) -> None:
        """The issue names the reference and its line."""
        issue = only_issue(tmp_path, f"version: 1\nmqtt:\n  password: {reference}\n", environ)
        assert (issue.line, issue.path) == (3, "mqtt.password")
        assert issue.message.startswith(f"secret {reference} ")

    @pytest.mark.timeout(20)  # without the bound, a FIFO blocks and /dev/zero reads for ever
    @pytest.mark.parametrize(
        ("make", "reason"),
        [
            (os.mkfifo, "not a regular file"),
            (lambda p: p.symlink_to("/dev/zero"), "not a regular file"),
            (lambda p: p.write_bytes(b"x" * (64 * 1024 + 1)), "larger than 64 KiB"),
        ],
        ids=["fifo", "dev-zero", "big"],
    )
    def test_secret_file_is_read_with_a_bound_and_never_blocks(
        self, tmp_path: Path, make: Callable[[Path], object], reason: str
    ) -> None:
        """A FIFO, a device or a huge file is refused at once, by reference."""
        secret = tmp_path / "pw"
        make(secret)
        issue = only_issue(tmp_path, f"version: 1\nmqtt:\n  password: ${{file:{secret}}}\n")
        assert issue.path == "mqtt.password"
        assert issue.message == f"secret ${{file:{secret}}} cannot be read: {reason}" + (
            " (a FIFO or a device?)" if reason == "not a regular file" else ""
        )

    def test_secret_file_of_64_kib_is_read_whole(self, tmp_path: Path) -> None:
        """The bound is inclusive: a 64 KiB certificate bundle path or token still loads."""
        (tmp_path / "pw").write_text("k" * (64 * 1024))
        text = f"version: 1\nmqtt:\n  password: ${{file:{tmp_path / 'pw'}}}\n"
        password = load(tmp_path, text).mqtt.password
        assert password is not None
        assert len(password.get_secret_value()) == 64 * 1024

    def test_secret_values_never_appear_in_errors(self, tmp_path: Path) -> None:
        """A resolved secret that fails validation is shown as <secret>."""
        text = (
            "version: 1\ngateway: {id: '${env:GW}'}\nmqtt:\n  qos: ${env:QOS}\n"
            "  password: ${env:PW}\n  retain: maybe\n"
        )
        environ = {"GW": "hunter 2", "QOS": "hunter3", "PW": "hunter4"}
        with pytest.raises(ConfigError) as caught:
            load(tmp_path, text, environ)
        assert len(caught.value.issues) == 3
        assert "hunter" not in str(caught.value)
        assert "<secret>" in str(caught.value)


class TestShippedConfigs:
    """The example configs in configs/ are valid, and the schema describes them."""

    @pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
    def test_example_config_loads_cleanly(self, path: Path) -> None:
        """Every configs/*.yaml loads with no issues."""
        config = load_config(path, environ={})
        assert config.source == str(path)
        assert config.devices

    def test_example_config_leaves_state_dir_to_systemd(self) -> None:
        """Copied to /etc/m2m-bridge/, the example must not point at a read-only ./state."""
        config = load_config(CONFIGS / "bridge.yaml", environ={"STATE_DIRECTORY": "/var/x"})
        assert config.gateway.state_dir == "/var/x"
        assert not config.warnings

    def test_example_pump_drive_merges_overrides(self) -> None:
        """pump-1 keeps the map's points with its overrides in place and its additions last."""
        pump = load_config(CONFIGS / "bridge.yaml", environ={}).device("pump-1")
        names = [p.name for p in pump.points]
        assert names[-1] == "motor_current"
        temperature = pump.points[names.index("temperature")]
        assert temperature.deadband == 0.5
        assert pump.points[names.index("run_hours")].order == "CDAB"

    def test_json_schema_describes_the_format(self) -> None:
        """The schema is a dict whose properties include devices, and durations accept text."""
        schema = config_json_schema()
        assert "devices" in schema["properties"]
        assert "Point" in schema["$defs"]
        keepalive = schema["$defs"]["MqttSettings"]["properties"]["keepalive"]
        assert {"type": "string"} in keepalive["anyOf"]


def test_the_demo_finds_the_example_config() -> None:
    """`scripts/demo` runs `m2m-bridge demo` with no -c: its default is configs/bridge.yaml."""
    from bridge.sim.demo import DEFAULT_CONFIG

    assert DEFAULT_CONFIG == CONFIGS / "bridge.yaml"
    assert DEFAULT_CONFIG.is_file()
