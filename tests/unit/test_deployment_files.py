"""The deployment files users start from, checked statically (no Docker engine runs here):
docker-compose.yml parses, pins every image, mounts only files that exist, sets only variables weft
reads (and the README names), probes a health path weft serves; the NATS configs it mounts are
accepted by the real nats-server's config check."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from weft.api.openapi import OPERATIONS
from weft.store.embedded import nats_server_binary

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
SOURCE = "\n".join(p.read_text() for p in (ROOT / "weft").rglob("*.py"))
README = (ROOT / "README.md").read_text()


def test_every_image_is_pinned_to_a_version() -> None:
    for name, svc in SERVICES.items():
        image = svc.get("image")
        assert image, f"{name} has no image"
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: {image} is not pinned"


def test_every_mounted_file_exists() -> None:
    for name, svc in SERVICES.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"


def env_names(svc: dict[str, Any]) -> list[str]:
    env = svc.get("environment") or {}
    return list(env) if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]


def test_every_variable_set_is_one_weft_reads_and_the_readme_names() -> None:
    weft = [n for n, s in SERVICES.items() if str(s.get("image", "")).startswith("weft:")]
    assert weft, "no weft service"
    for name in weft:
        for var in env_names(SERVICES[name]):
            assert f'"{var}"' in SOURCE or f"'{var}'" in SOURCE, f"{name} sets {var}, which weft never reads"
            assert var in README, f"{name} sets {var}, which the README does not name"


def test_health_checks_probe_a_path_weft_serves() -> None:
    paths = {path for method, path, *_ in OPERATIONS if method == "get"}
    probed = 0
    for svc in SERVICES.values():
        for part in (svc.get("healthcheck") or {}).get("test", []):
            for path in re.findall(r"127\.0\.0\.1:\d+(/[\w/]*)", part):
                assert path in paths, f"health check probes {path}, which weft does not serve"
                probed += 1
    assert probed


@pytest.mark.parametrize("conf", sorted((ROOT / "ops" / "nats").glob("nats*.conf")), ids=lambda p: p.name)
def test_the_nats_configs_pass_the_servers_own_check(conf: Path) -> None:
    assert "sync_interval: always" in conf.read_text()
    out = subprocess.run([nats_server_binary(), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr + out.stdout
