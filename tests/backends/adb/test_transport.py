"""Shell-v2 packet framing and adb server resolution (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.backends.adb.transport import (
    CLOSE_STDIN,
    EXIT,
    MAX_STDIN_CHUNK,
    STDIN,
    STDOUT,
    LineBuffer,
    V2Decoder,
    encode_packet,
    encode_stdin,
    parse_server,
    resolve_adb_servers,
)
from server.settings import Settings


def test_packet_layout_is_id_length_le_data() -> None:
    assert encode_packet(STDOUT, b"hi") == b"\x01\x02\x00\x00\x00hi"
    assert encode_packet(CLOSE_STDIN) == b"\x04\x00\x00\x00\x00"


packets = st.lists(st.tuples(st.integers(0, 5), st.binary(max_size=300)), max_size=20)


@settings(max_examples=50, deadline=None)
@given(packets, st.data())
def test_decoder_reassembles_packets_split_anywhere(
    pkts: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    wire = b"".join(encode_packet(k, d) for k, d in pkts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    dec = V2Decoder()
    got: list[tuple[int, bytes]] = []
    prev = 0
    for cut in [*cuts, len(wire)]:
        got += dec.feed(wire[prev:cut])
        prev = cut
    assert got == pkts
    assert dec.pending == 0


def test_large_stdin_is_split_into_chunks_adbd_accepts() -> None:
    data = bytes(range(256)) * 200  # 51200 bytes
    dec = V2Decoder()
    pkts = dec.feed(encode_stdin(data))
    assert all(k == STDIN and len(d) <= MAX_STDIN_CHUNK for k, d in pkts)
    assert b"".join(d for _, d in pkts) == data


def test_exit_packet_carries_the_code() -> None:
    assert V2Decoder().feed(encode_packet(EXIT, b"\x86")) == [(EXIT, b"\x86")]


def test_line_buffer_splits_and_cuts_endless_lines() -> None:
    lb = LineBuffer(limit=10)
    assert lb.feed(b"ab") == []
    assert lb.feed(b"c\nde\nf") == [b"abc", b"de"]
    assert lb.feed(b"0123456789xyz") == [b"f0123456789xyz"]
    assert lb.flush() == b""


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1:5037", ("127.0.0.1", 5037)),
        ("tcp:10.0.0.2:5038", ("10.0.0.2", 5038)),
        ("5039", ("127.0.0.1", 5039)),
        ("[::1]:5037", ("::1", 5037)),
        ("phones.lan:15037", ("phones.lan", 15037)),
    ],
)
def test_parse_server(text: str, parsed: tuple[str, int]) -> None:
    assert parse_server(text) == parsed


@pytest.mark.parametrize("bad", ["host:", "host:port", "host:70000", ""])
def test_parse_server_rejects_garbage(bad: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_server(bad)


def test_configured_servers_win_over_the_environment() -> None:
    s = Settings(adb_servers=["a:1", "b:2", "a:1"])
    assert resolve_adb_servers(s, {"ANDROID_ADB_SERVER_PORT": "9"}) == [("a", 1), ("b", 2)]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ("127.0.0.1", 5037)),
        ({"ANDROID_ADB_SERVER_PORT": "6000"}, ("127.0.0.1", 6000)),
        ({"ADB_SERVER_SOCKET": "tcp:10.1.2.3:7000", "ANDROID_ADB_SERVER_PORT": "6000"}, ("10.1.2.3", 7000)),
        ({"ADB_SERVER_SOCKET": "tcp:7001"}, ("127.0.0.1", 7001)),
    ],
)
def test_local_server_follows_adb_environment_conventions(
    env: dict[str, str], expected: tuple[str, int]
) -> None:
    assert resolve_adb_servers(Settings(adb_servers=[]), env) == [expected]


def test_unix_socket_server_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="tcp"):
        resolve_adb_servers(Settings(adb_servers=[]), {"ADB_SERVER_SOCKET": "localfilesystem:/tmp/adb"})
