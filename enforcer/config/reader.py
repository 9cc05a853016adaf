"""Reading a config file: the YAML, every section, and every problem by key path and
``file:line`` at once.

``load_config`` is what the daemon and the portal call: a ``Config`` or a ``ConfigError``
naming every problem. ``read_config`` is what ``check-config`` calls: it also returns the
config as far as it could be read (defaults where a value was refused) and which keys were
refused, so the checks that need the config (list, secrets, branding) run in the same pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import yamlsource
from ..issues import IssuesError
from . import sections, values
from .keys import ConfigIssue, KeyPath, KeyReader, where
from .schema import Config

DEFAULT_PATH = "/etc/walled-garden/config.yaml"


def default_config_path() -> str:
    """``WALLED_GARDEN_CONFIG`` overrides the packaged default."""
    return os.environ.get("WALLED_GARDEN_CONFIG") or DEFAULT_PATH


class ConfigError(IssuesError):
    """The configuration was rejected; ``issues`` names every problem."""


@dataclass(frozen=True)
class Reading:
    """A config file as far as it could be read, with every problem found in it."""

    path: str
    #: None when the file could not be read or is not YAML; otherwise defaults stand in for
    #: the refused values, so it is only for further checks, never to run with.
    config: Config | None
    issues: tuple[ConfigIssue, ...]
    refused_paths: frozenset[KeyPath] = frozenset()
    #: The keys' lines, for naming a key in a problem found after reading (``where``).
    located: yamlsource.Located | None = field(default=None, compare=False, repr=False)

    def where(self, *path: str | int) -> str:
        """``api.webhook_secret_file (config.yaml:12)``: a key as check-config names it."""
        return where(self.located, self.path, path)

    def refused(self, *path: str | int) -> bool:
        """True if the value at ``path``, or a section holding it, was refused."""
        if self.config is None:
            return True
        return any(path[:len(bad)] == bad for bad in self.refused_paths)

    def refused_within(self, *path: str | int) -> bool:
        """True if ``refused(*path)`` or any value inside the section at ``path`` was refused."""
        return self.refused(*path) or any(bad[:len(path)] == path for bad in self.refused_paths)

    def valid(self) -> Config:
        """The config, or ``ConfigError`` naming every problem."""
        if self.issues or self.config is None:
            raise ConfigError(list(self.issues))
        return self.config


def load_config(path: str | None = None) -> Config:
    """Read and validate; raises ``ConfigError`` naming every problem."""
    return read_config(path).valid()


def read_config(path: str | None = None) -> Reading:
    """Read the file and every section; never raises ``ConfigError`` (see ``Reading``)."""
    path = path or default_config_path()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        return Reading(path, None, (ConfigIssue(path, f"cannot read: {exc.strerror or exc}"),))
    return read_text(text, path)


def parse_config(text: str, path: str = "config.yaml") -> Config:
    """``load_config`` for text already read (tests, tools)."""
    return read_text(text, path).valid()


def read_text(text: str, path: str = "config.yaml") -> Reading:
    """``read_config`` for text already read."""
    try:
        located = yamlsource.load(text)
    except yamlsource.YamlSyntaxError as exc:
        where = f"{path}:{exc.line}" if exc.line else path
        return Reading(path, None, (ConfigIssue(where, f"not valid YAML: {exc}"),))
    r = KeyReader(located, path)
    top = r.section(located.data, (), sections.TOP_LEVEL)
    if located.data is None:
        r.fail((), "the file is empty")
    state_dir = r.get(top, ("state_dir",), values.at_config(path, values.directory_to_be), "/var/lib/walled-garden")
    subscribers = sections.subscribers(r, top, path)
    gateway = sections.gateway(r, top)
    garden = sections.walled_garden(r, top)
    portal = sections.portal(r, top, path)
    api = sections.api(r, top)
    metrics = sections.metrics(r, top)
    policy = sections.policy(r, top)
    fleet = sections.fleet(r, top)
    sections.separate_secrets(r, api, policy)
    sections.forwarder_port(r, garden, portal, api, metrics)
    sections.distinct_listeners(r, subscribers, portal, api, metrics)
    sections.backend_support(r, gateway, garden, policy)
    config = Config(path=path, state_dir=state_dir, subscribers=subscribers, gateway=gateway,
                    walled_garden=garden, portal=portal, api=api, metrics=metrics, policy=policy, fleet=fleet)
    return Reading(path, config, tuple(r.issues), frozenset(r.refused), located)
