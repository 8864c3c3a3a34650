"""HyperPyYAML configuration for the CLIs that are not a SpeechBrain ``Brain`` (the export).

A yaml file holds every knob once: a top-level ``key: default  # help`` line each (a comment on the lines right
below continues the help), and objects built from them with ``!new:`` / ``!ref`` (as SpeechBrain recipes declare
their modules). The command line overrides top-level keys the SpeechBrain way, ``--key value`` (the value is read
as yaml: ``--sample_rate 22050``, ``--device cpu``, ``--hmm_schedule [1,2,4]``); a boolean key also takes
``--key`` alone (True) and ``--no_key`` (False). ``--help`` and README's option tables are generated from the same
lines (``help_text``, ``markdown_table``), so a default is written once.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

from common.io import UserError

_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):(.*)$")
_CONT = re.compile(r"^\s+#\s?(.*)$")
PLACEHOLDER = "!PLACEHOLDER"
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclass(frozen=True)
class Option:
    key: str
    default: object  # the yaml value; PLACEHOLDER for a required one
    help: str

    @property
    def required(self) -> bool:
        return self.default is PLACEHOLDER

    def shown(self) -> str:
        """The default as the README / --help show it."""
        if self.required:
            return "(required)"
        if self.default is None:
            return "null"
        return str(self.default)


def _yaml_value(text: str):
    import ruamel.yaml

    return ruamel.yaml.YAML(typ="safe", pure=True).load(io.StringIO(text))


def read_options(yaml_path: str | Path) -> dict[str, Option]:
    """The top-level scalar/list keys of ``yaml_path`` (its CLI options) with their defaults and help, in file
    order. Keys whose value is an object (``!new:``, ``!name:``, a nested mapping) are not options."""
    lines = Path(yaml_path).read_text(encoding="utf-8").splitlines()
    out: dict[str, Option] = {}
    i = 0
    while i < len(lines):
        m = _KEY.match(lines[i])
        i += 1
        if not m:
            continue
        key, rest = m.group(1), m.group(2)
        value, _, comment = rest.partition("#")
        value = value.strip()
        helps = [comment.strip()] if comment.strip() else []
        while i < len(lines) and _CONT.match(lines[i]) and not _KEY.match(lines[i]):
            helps.append(_CONT.match(lines[i]).group(1).strip())
            i += 1
        if not value or value.startswith(("!new:", "!name:", "!apply:", "!ref", "!copy")):
            continue
        default = PLACEHOLDER if value == PLACEHOLDER else _yaml_value(value)
        out[key] = Option(key, default, " ".join(helps))
    return out


def _coerce(opt: Option, value, flag: str):
    """A command-line value checked against the type of the yaml default."""
    d = opt.default
    if isinstance(d, bool):
        if isinstance(value, bool):
            return value
        raise UserError(f"{flag} takes True or False, got {value!r}")
    if isinstance(d, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(d, (int, float)) and not isinstance(d, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{flag} takes a number, got {value!r}")
        if isinstance(d, int) and isinstance(value, float) and not value.is_integer():
            raise UserError(f"{flag} takes a whole number, got {value!r}")
        return type(d)(value)
    if isinstance(d, str) and not isinstance(value, str) and value is not None:
        return str(value)
    return value


def parse_overrides(argv: list[str], options: dict[str, Option]) -> dict:
    """``--key value`` / ``--key`` / ``--no_key`` tokens -> ``{key: value}`` (typed like the defaults)."""
    out: dict = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if not tok.startswith("--") or len(tok) < 3:
            raise UserError(f"unexpected argument {tok!r}; options are --key value (see --help)")
        name, eq, inline = tok[2:].partition("=")
        key, negated = name, False
        if key not in options and key.startswith("no_") and key[3:] in options \
                and isinstance(options[key[3:]].default, bool):
            key, negated = key[3:], True
        if key not in options:
            close = [k for k in options if k.startswith(name[:4])][:3]
            raise UserError(f"unknown option --{name}" + (f" (did you mean {', '.join('--' + c for c in close)}?)"
                                                        if close else "") + "; see --help")
        opt = options[key]
        if negated:
            if eq:
                raise UserError(f"--{name} takes no value")
            out[key] = False
            continue
        if eq:
            text = inline
        elif isinstance(opt.default, bool) and (i >= len(argv) or argv[i].lower() not in _TRUE + _FALSE):
            out[key] = True  # a boolean flag given alone
            continue
        elif i < len(argv):
            text = argv[i]
            i += 1
        else:
            raise UserError(f"--{key} needs a value")
        if isinstance(opt.default, bool) and text.lower() in _TRUE + _FALSE:
            value = text.lower() in _TRUE
        elif isinstance(opt.default, str) or opt.required:
            value = text  # paths and names stay strings (a folder called 1234, a device 'cuda:0')
        else:
            try:
                value = _yaml_value(text)
            except Exception:  # noqa: BLE001 - any yaml error: report the flag
                raise UserError(f"--{key}: cannot read {text!r}") from None
        out[key] = _coerce(opt, value, f"--{key}")
    return out


def load(yaml_path: str | Path, overrides: dict | None = None) -> dict:
    """``load_hyperpyyaml`` of the file with ``overrides`` (top-level keys); a required key left unset, or a key the
    file does not have, is a ``UserError``."""
    from hyperpyyaml import load_hyperpyyaml

    options = read_options(yaml_path)
    # hyperpyyaml writes the overrides out as yaml: a library caller's Path values go in as their text
    overrides = {k: str(v) if isinstance(v, Path) else v for k, v in (overrides or {}).items()}
    unknown = [k for k in overrides if k not in options]
    if unknown:
        raise UserError(f"unknown option(s) {', '.join('--' + k for k in unknown)} for {yaml_path}")
    missing = [k for k, o in options.items() if o.required and overrides.get(k) in (None, "")]
    if missing:
        raise UserError(f"{', '.join('--' + k for k in missing)} required (see --help)")
    with open(yaml_path, encoding="utf-8") as fh:
        return load_hyperpyyaml(fh, overrides)


def help_text(options: dict[str, Option], usage: str) -> str:
    lines = [usage, "", "options (defaults from the yaml file; booleans also take --key / --no_key):"]
    for o in options.values():
        lines.append(f"  --{o.key} {'' if o.required else '(default ' + o.shown() + ')'}")
        if o.help:
            lines.append(f"        {o.help}")
    return "\n".join(lines)


def markdown_table(options: dict[str, Option]) -> str:
    """README's table of the options: ``| flag | default | meaning |``."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for o in options.values():
        rows.append(f"| `--{o.key}` | `{o.shown()}` | {o.help.replace('|', '/')} |")
    return "\n".join(rows)
