"""Node identity: detected addresses, and the --node-ip / $TORCHCORE_NODE_IP overrides."""

import ipaddress

import pytest

from torchcore.errors import TorchcoreError
from torchcore.node import ENV_HOSTNAME, ENV_IPS, Node, interface_addresses, parse_addresses


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv(ENV_IPS, raising=False)
    monkeypatch.delenv(ENV_HOSTNAME, raising=False)


def test_override_replaces_the_detected_addresses():
    node = Node.detect(["10.0.0.5", "2001:db8::5,10.0.0.6", "10.0.0.5"])
    assert node.addresses == (ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("2001:db8::5"),
                              ipaddress.ip_address("10.0.0.6"))


def test_environment_variable_is_comma_separated(monkeypatch):
    monkeypatch.setenv(ENV_IPS, " 10.0.0.5 , ::1 ")
    assert [str(a) for a in Node.detect().addresses] == ["10.0.0.5", "::1"]


def test_the_command_line_beats_the_environment(monkeypatch):
    monkeypatch.setenv(ENV_IPS, "10.0.0.5")
    assert [str(a) for a in Node.detect(["10.0.0.9"]).addresses] == ["10.0.0.9"]


def test_bad_override_names_its_source(monkeypatch):
    with pytest.raises(TorchcoreError, match=r"--node-ip: 'web1' is not an IPv4 or IPv6 address"):
        Node.detect(["web1"])
    with pytest.raises(TorchcoreError, match="networks are not node addresses"):
        Node.detect(["10.0.0.0/24"])
    monkeypatch.setenv(ENV_IPS, "10.0.0.5,10.0.0.256")
    with pytest.raises(TorchcoreError, match=r"TORCHCORE_NODE_IP: '10.0.0.256' is not"):
        Node.detect()


def test_an_override_with_no_address_is_an_error():
    with pytest.raises(TorchcoreError, match="no address given"):
        parse_addresses([" , "], "--node-ip")


def test_detected_addresses_come_from_the_interfaces():
    addresses = interface_addresses()
    assert ipaddress.ip_address("127.0.0.1") in addresses
    assert all(isinstance(a, (ipaddress.IPv4Address, ipaddress.IPv6Address)) for a in addresses)
    assert Node.detect().addresses == addresses


def test_hostname_is_detected_or_overridden(monkeypatch):
    import socket

    assert Node.detect(["10.0.0.5"]).hostname == socket.gethostname()
    monkeypatch.setenv(ENV_HOSTNAME, "web-1.example.com")
    assert Node.detect(["10.0.0.5"]).hostname == "web-1.example.com"
    assert Node.detect(["10.0.0.5"], hostname="db1").hostname == "db1"


def test_describe_lists_the_addresses():
    assert Node.detect(["10.0.0.5", "::1"], hostname="db1").describe() == "db1 (10.0.0.5, ::1)"
